"""The distributed half of tests/test_fsdp.py: run by `torchrun --nproc-per-node 2` (gloo, CPU), it loads a tiny
Llama with each lowbit scheme, trains LoRA adapters under FSDP2 and in one process, and rank 0 writes what the
tests compare to a JSON file. Usage: fsdp_worker.py MODEL_DIR ODD_MODEL_DIR OUT_DIR (ODD_MODEL_DIR: shapes whose
quantized tensors do not split evenly in two, so shards are padded)."""

import hashlib
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.fsdp import prepare_fsdp, sharded_state_names
from lowbit.nn import QuantizedLinear

SCHEMES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-bf16-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
    "int8-wo": dict(load_in_8bit=True, llm_int8_weight_only=True),
}
STEPS = 20  # LoRA steps; a DCP checkpoint is written after STEPS // 2 and resumed from


def load(model_dir, scheme, lora_seed=1, checkpointing=False):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=lowbit.LowbitConfig(**SCHEMES[scheme]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(lora_seed)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


def shard(model, mp_policy=None):
    prepare_fsdp(model)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batch(step):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train(model, optimizer, steps):
    losses = []
    for step in steps:
        loss = model(**batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def quantized_bytes(model, only=None):
    """Bytes of lowbit layers' quantized state (not the bias) this rank holds: a sharded parameter counts its
    local shard. `only`: a predicate on the tensor's name within its layer."""
    total = 0
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            for name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
                if name != "bias" and (only is None or only(layer, name)):
                    t = t.to_local() if hasattr(t, "to_local") else t
                    total += t.numel() * t.element_size()
    return total


def replicated(layer, name):
    return name not in sharded_state_names(layer)


def quantized_state(state_dict):
    """sha256 of each state-dict entry of the lowbit layers under the adapters (packed weights, scales, tables,
    the quant_state JSON; not the bias): equal digests are equal bytes, dtype and shape."""
    return {k: (str(t.dtype), tuple(t.shape), hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest())
            for k, t in state_dict.items() if ".base_layer." in k and not k.endswith(".bias")}  # fmt: skip


def lora_state(state_dict):
    return {k: t.float() for k, t in state_dict.items() if "lora_" in k}


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(model_dir, odd_model_dir, out_dir):
    rank = dist.get_rank()
    results = {"world_size": dist.get_world_size()}
    checkpoint_root = tempfile.mkdtemp() if rank == 0 else None
    objects = [checkpoint_root]
    dist.broadcast_object_list(objects)
    checkpoint_root = objects[0]
    for scheme, directory in [*((s, model_dir) for s in SCHEMES), ("nf4-odd", odd_model_dir)]:
        r = results[scheme] = {}
        scheme = scheme.removesuffix("-odd")
        # One process (every rank runs it alike: the reference, and the bytes before sharding).
        single = load(directory, scheme)
        base_before = quantized_state(single.state_dict())
        r["bytes_one_process"] = quantized_bytes(single)
        r["bytes_replicated"] = quantized_bytes(single, replicated)
        single_opt = optimizer_for(single)
        r["losses_one_process"] = train(single, single_opt, range(STEPS))
        single_lora = lora_state(single.state_dict())

        # FSDP2: shard, train half, checkpoint (DCP), train the rest.
        model = shard(load(directory, scheme))
        r["bytes_per_rank"] = quantized_bytes(model)
        optimizer = optimizer_for(model)
        losses = train(model, optimizer, range(STEPS // 2))
        checkpoint = os.path.join(checkpoint_root, scheme)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        losses += train(model, optimizer, range(STEPS // 2, STEPS))
        r["losses_fsdp"] = losses
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        r["full_state_plain"] = all(type(t) is torch.Tensor for t in full.values()) if rank == 0 else True
        r["base_unchanged"] = quantized_state(full) == base_before if rank == 0 else True
        r["base_entries"] = len(base_before)
        r["lora_difference"] = max_difference(lora_state(full), single_lora) if rank == 0 else 0.0
        if scheme == "nf4" and directory == model_dir:  # for the tests to reload in one process
            with torch.no_grad():  # (a forward under FSDP2 is collective: every rank runs it)
                r["logits_after"] = model(input_ids=batch(99)["input_ids"]).logits.tolist()
            if rank == 0:
                torch.save(full, os.path.join(out_dir, "nf4_full_state.pt"))

        # Resume from the checkpoint into a model whose adapters start elsewhere.
        resumed = shard(load(directory, scheme, lora_seed=7))
        resumed_opt = optimizer_for(resumed)
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        r["losses_resumed"] = train(resumed, resumed_opt, range(STEPS // 2, STEPS))
        del single, model, resumed

    # Mixed precision and activation checkpointing, on one 4-bit scheme with float32 scales.
    scales_seen = set()

    def record_scales(layer, args):
        scales_seen.add(str(layer.absmax.dtype))

    mp = shard(load(model_dir, "nf4"), MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    for layer in mp.modules():
        if isinstance(layer, lowbit.Linear4bit):
            layer.register_forward_pre_hook(record_scales)
    results["mixed_precision"] = {"losses": train(mp, optimizer_for(mp), range(STEPS)), "scales": sorted(scales_seen)}
    full = get_model_state_dict(mp, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    reference = load(model_dir, "nf4")
    results["mixed_precision"]["base_unchanged"] = (
        quantized_state(full) == quantized_state(reference.state_dict()) if rank == 0 else True
    )
    checkpointed = shard(load(model_dir, "nf4", checkpointing=True))
    results["checkpointing_losses"] = train(checkpointed, optimizer_for(checkpointed), range(STEPS))

    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    try:
        run(*sys.argv[1:4])
    finally:
        dist.destroy_process_group()
