"""The way people launch FSDP2 QLoRA, on 2 CPU ranks (tests/test_fsdp.py runs it):

    torchrun --nproc-per-node 2 fsdp_launch_worker.py trainer MODEL_DIR OUT_DIR      (transformers Trainer, `fsdp` args)
    accelerate launch --config_file FSDP2.yaml fsdp_launch_worker.py accelerate MODEL_DIR OUT_DIR

accelerate turns FSDP on only for accelerator devices: on CPU ranks it silently runs DDP instead
(accelerate/state.py, AcceleratorState.__init__ sets DistributedType.FSDP only in its MULTI_GPU/XPU/NPU/... branch).
`use_fsdp_on_cpu` switches its state to FSDP after it is built, so accelerate's own FSDP2 preparation
(accelerate.utils.fsdp2_prepare_model, the code that has bitsandbytes special cases) runs on these CPU ranks as
it would on GPUs. Rank 0 writes what it measured to OUT_DIR/<mode>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import lowbit
from lowbit.fsdp import is_prepared
from lowbit.nn import QuantizedLinear

from fsdp_worker import quantized_bytes  # (beside this script: torchrun puts its folder on the path)


def use_fsdp_on_cpu(accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState copies it from here when rebuilt
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class CpuFsdpTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        use_fsdp_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
        self.is_fsdp_enabled = True


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=lowbit.LowbitConfig(load_in_4bit=True))
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


def with_trainer(model_dir, out):
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
        fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    model = load(model_dir)
    bytes_one_process = quantized_bytes(model)
    lowbit.prepare_fsdp(model)  # torchrun: nothing told lowbit that FSDP2 is coming
    trainer = CpuFsdpTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    trainer.save_model(str(out / "adapters"))
    return {
        "sharded_by": type(trainer.model_wrapped).__name__,
        "bytes_one_process": bytes_one_process,
        "bytes_per_rank": quantized_bytes(trainer.model_wrapped),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def with_accelerate(model_dir, out):
    from accelerate import Accelerator

    model = load(model_dir)
    prepared_on_load = all(is_prepared(m) for m in model.modules() if isinstance(m, QuantizedLinear))
    bytes_one_process = quantized_bytes(model)
    accelerator = Accelerator()
    use_fsdp_on_cpu(accelerator, FullyShardedDataParallelPlugin())  # the launcher's FSDP2 config, from its variables
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(4):
        batch = Tokens()[step]
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = accelerator.get_state_dict(model)
    return {
        "sharded_by": type(model).__name__,
        "prepared_on_load": prepared_on_load,
        "bytes_one_process": bytes_one_process,
        "bytes_per_rank": quantized_bytes(model),
        "losses": losses,
        "full_state_plain": all(type(t) is torch.Tensor for t in state.values()) if dist.get_rank() == 0 else True,
    }


if __name__ == "__main__":
    mode, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    result = {"trainer": with_trainer, "accelerate": with_accelerate}[mode](model_dir, out)
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(result))
