"""FSDP2 (fully_shard) with lowbit layers: the quantized state is sharded (each of 2 ranks holds half of it), LoRA
training gives the losses of one process, checkpoints (full and DCP) round-trip, mixed precision leaves the
quantized bytes alone. The distributed runs are one `torchrun` job (tests/fsdp_worker.py, gloo on the CPU);
lowbit.fsdp's behaviour in one process is tested directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.fsdp import ShardedState, is_prepared, prepare_fsdp, sharded_state_names
from lowbit.nn import Linear4bit, Linear8bit

pytest.importorskip("peft")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORKER = Path(__file__).with_name("fsdp_worker.py")
SCHEMES = ["nf4", "nf4-bf16-storage", "nf4-dq", "fp4", "int8", "int8-wo", "nf4-odd"]


def _run(command: list[str], what: str) -> subprocess.CompletedProcess:
    """Runs a multi-process job (one thread a rank: two ranks share the machine) and fails with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, f"{what} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


@pytest.fixture(scope="module")
def distributed(tiny_llama_factory, tmp_path_factory):
    """Results of the two-rank run (see tests/fsdp_worker.py), and the directory it wrote to."""
    out = tmp_path_factory.mktemp("fsdp")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
          str(tiny_llama_factory()), str(tiny_llama_factory("odd")), str(out)], "the torchrun job")  # fmt: skip
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_rank_holds_half_of_the_quantized_state(distributed, scheme):
    r = distributed[0][scheme]
    # The sharded tensors split in two (rank 0 holds the larger half of an odd split, padded by FSDP to
    # the same size on every rank); the small tables stay whole on each rank.
    expected = (r["bytes_one_process"] - r["bytes_replicated"]) / 2 + r["bytes_replicated"]
    assert expected <= r["bytes_per_rank"] <= expected * 1.01
    assert r["bytes_replicated"] <= 0.1 * r["bytes_one_process"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_under_fsdp_trains_like_one_process(distributed, scheme):
    r = distributed[0][scheme]
    # Both ranks see the same batches, so the averaged gradient is each rank's own: no reduction-order
    # difference is expected, and none is allowed beyond float32 rounding of the average.
    torch.testing.assert_close(r["losses_fsdp"], r["losses_one_process"], rtol=1e-6, atol=0)
    assert r["lora_difference"] <= 1e-6
    assert len(set(r["losses_fsdp"])) > 1  # the steps change something


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dcp_checkpoint_resumes_the_same_trajectory(distributed, scheme):
    r = distributed[0][scheme]
    half = len(r["losses_fsdp"]) // 2
    torch.testing.assert_close(r["losses_resumed"], r["losses_fsdp"][half:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gathered_full_state_dict_is_the_single_process_one(distributed, scheme):
    r = distributed[0][scheme]
    assert r["full_state_plain"], "the gathered state dict holds tensor subclasses"
    assert r["base_entries"] > 0
    assert r["base_unchanged"], "quantized tensors differ from one process's (bytes, dtype or shape), or changed"


def test_gathered_state_dict_reloads_in_one_process(distributed, tiny_llama_dir):
    results, out = distributed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.load_state_dict(torch.load(out / "nf4_full_state.pt"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(results["nf4"]["logits_after"]), rtol=0, atol=0)

    # The base model after training exports to bitsandbytes' format, and bitsandbytes loads it (where installed).
    bnb = pytest.importorskip("bitsandbytes")
    lowbit.export_bitsandbytes(model.unload(), out / "bnb")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "bnb")
    assert reloaded.config.quantization_config.quant_method == "bitsandbytes"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    lowbit.export_bitsandbytes(fresh, out / "bnb-fresh")  # what one process exports without any training
    from safetensors.torch import load_file

    trained, untouched = load_file(out / "bnb" / "model.safetensors"), load_file(out / "bnb-fresh" / "model.safetensors")
    assert trained.keys() == untouched.keys()
    assert all(torch.equal(trained[k].view(-1).view(torch.uint8), untouched[k].view(-1).view(torch.uint8)) for k in trained)


def test_mixed_precision_does_not_cast_the_quantized_state(distributed):
    mp = distributed[0]["mixed_precision"]
    assert mp["scales"] == ["torch.float32"], "block scales reached the kernels cast to the policy's dtype"
    assert mp["base_unchanged"]
    reference = distributed[0]["nf4"]["losses_one_process"]
    # bfloat16 compute: near the float32 run, not equal to it.
    torch.testing.assert_close(mp["losses"], reference, rtol=2e-2, atol=0)


def test_activation_checkpointing_under_fsdp(distributed):
    results = distributed[0]
    torch.testing.assert_close(results["checkpointing_losses"], results["nf4"]["losses_one_process"], rtol=1e-6, atol=0)


# -- the launchers people use: the transformers Trainer under torchrun, and accelerate launch --------------

ACCELERATE_FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
use_cpu: true
mixed_precision: 'no'
main_process_port: {port}
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""


def _launch(command, out, mode):
    _run(command, f"the {mode} run")
    return json.loads((out / f"{mode}.json").read_text())


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_WORKER = Path(__file__).with_name("fsdp_launch_worker.py")


def test_trainer_with_fsdp2_arguments_shards_the_quantized_state(tiny_llama_dir, tmp_path):
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 str(LAUNCH_WORKER), "trainer", str(tiny_llama_dir), str(tmp_path)], tmp_path, "trainer")  # fmt: skip
    assert r["sharded_by"].startswith("FSDP")
    assert r["bytes_per_rank"] <= 0.51 * r["bytes_one_process"]
    assert len(r["losses"]) == 4 and all(0 < loss < 10 for loss in r["losses"])
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()


def test_accelerate_launch_with_an_fsdp2_config_prepares_on_load(tiny_llama_dir, tmp_path):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(ACCELERATE_FSDP2_CONFIG.format(port=_free_port()))
    r = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                 str(LAUNCH_WORKER), "accelerate", str(tiny_llama_dir), str(tmp_path)], tmp_path, "accelerate")  # fmt: skip
    assert r["prepared_on_load"], "from_pretrained under accelerate launch (FSDP2) did not prepare the layers"
    assert r["sharded_by"].startswith("FSDP")
    assert r["bytes_per_rank"] <= 0.51 * r["bytes_one_process"]
    assert all(0 < loss < 10 for loss in r["losses"]) and r["full_state_plain"]


def test_accelerate_fsdp2_environment_prepares_on_load_and_refuses_ram_efficient_loading(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    config = lowbit.LowbitConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, Linear8bit)]
    assert layers and all(is_prepared(m) for m in layers)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="does not support FSDP's cpu_ram_efficient_loading"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP1 flattens parameters: lowbit layers stay as they are there
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert not any(is_prepared(m) for m in model.modules() if isinstance(m, Linear8bit))


def test_fsdp_qlora_example_on_the_built_in_model():
    """examples/fsdp_qlora.py as written (2 spawned ranks, the built-in SmolLM2-135M), a few steps."""
    example = Path(__file__).parents[1] / "examples" / "fsdp_qlora.py"
    run = _run([sys.executable, str(example), "--steps", "3", "--seq-len", "64", "--json"], "the example")
    ranks = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(ranks) == 2
    for r in ranks:
        assert r["quantized_bytes_per_rank"] <= 0.501 * r["quantized_bytes_one_process"]
        assert len(r["losses"]) == 3 and all(0 < loss < 20 for loss in r["losses"])


# -- prepare_fsdp in one process ----------------------------------------------------------------------


def _bytes(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 64)
    return {
        "nf4": Linear4bit.from_linear(linear),
        "nf4-dq-bf16": Linear4bit.from_linear(linear, double_quant=True, quant_storage=torch.bfloat16),
        "int8": Linear8bit.from_linear(linear),
        "int8-wo": Linear8bit.from_linear(linear, weight_only=True),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_prepared_layer_computes_and_saves_the_same(name, tmp_path):
    layer = _layers()[name]
    x = torch.randn(3, 192)
    before, state_before = layer(x), layer.state_dict()
    prepare_fsdp(layer)
    prepare_fsdp(layer)  # idempotent
    assert is_prepared(layer)
    for key in sharded_state_names(layer):
        assert isinstance(layer._parameters[key], ShardedState) and not layer._parameters[key].requires_grad
    assert not any(p.requires_grad for n, p in layer.named_parameters() if n != "bias")
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    state = layer.state_dict()
    assert state.keys() == state_before.keys()
    torch.save(state, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt")  # weights_only: saved as plain tensors
    for key, value in state_before.items():
        assert type(saved[key]) is torch.Tensor and value.dtype == saved[key].dtype and value.shape == saved[key].shape
        assert torch.equal(_bytes(value), _bytes(saved[key]))  # (packed bytes viewed as bfloat16 include NaNs)


def test_prepared_state_keeps_its_dtype_under_module_casts():
    layer = prepare_fsdp(_layers()["nf4-dq-bf16"])
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
    layer.to(torch.float16)
    assert {k: v.dtype for k, v in layer.state_dict().items() if k != "bias"} == {
        k: d for k, d in dtypes.items() if k != "bias"
    }
    assert layer.bias.dtype == torch.float16


def test_prepare_refuses_an_empty_layer_by_name():
    with pytest.raises(RuntimeError, match=r"Linear4bit\(192, 64\) holds no weight yet"):
        prepare_fsdp(Linear4bit(192, 64))


def test_prepared_layer_loads_a_checkpoint_in_place_and_names_a_mismatch():
    layers = _layers()
    target = prepare_fsdp(Linear4bit.from_linear(torch.nn.Linear(192, 64)))
    held = target.weight
    target.load_state_dict(layers["nf4"].state_dict())
    assert target.weight is held  # FSDP manages this object: it is filled, not replaced
    x = torch.randn(2, 192)
    torch.testing.assert_close(target(x), layers["nf4"](x), rtol=0, atol=0)
    other = Linear4bit.from_linear(torch.nn.Linear(192, 64), blocksize=128)
    with pytest.raises(ValueError, match=r"'absmax' is torch.float32 \[96\].*prepared for FSDP"):
        target.load_state_dict(other.state_dict())
    assert target.blocksize == 64  # refused before anything changed
    torch.testing.assert_close(target(x), layers["nf4"](x), rtol=0, atol=0)
