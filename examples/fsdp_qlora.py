"""QLoRA under FSDP2: the quantized base model sharded across ranks, LoRA adapters trained on top.

    python examples/fsdp_qlora.py                         # built-in SmolLM2-135M, 2 CPU ranks (spawned here)
    torchrun --nproc-per-node 4 examples/fsdp_qlora.py --model DIR --scheme nf4-dq   # any launcher, GPUs too

Each rank holds 1/N of every lowbit layer's quantized bytes at rest (lowbit.prepare_fsdp before fully_shard),
all-gathers a decoder layer's for its forward and backward, and frees them again. Prints the loss (averaged over
ranks), what each rank holds and the step time; with --json, one summary line for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowbit
from lowbit.compare import default_model_directory
from lowbit.compare.data import default_text
from lowbit.nn import QuantizedLinear

SCHEMES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
    "int8-wo": dict(load_in_8bit=True, llm_int8_weight_only=True),
}


def held_bytes(model) -> tuple[int, int]:
    """(bytes of lowbit layers' quantized state, bytes of all parameters and buffers) this rank holds."""
    quantized = total = 0
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            t = t.to_local() if hasattr(t, "to_local") else t  # a sharded parameter: this rank's shard
            total += t.numel() * t.element_size()
            if isinstance(module, QuantizedLinear) and name != "bias":
                quantized += t.numel() * t.element_size()
    return quantized, total


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def train(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_dir = args.model or default_model_directory()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(default_text()).input_ids)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=lowbit.LowbitConfig(**SCHEMES[args.scheme]), device_map={"": device}
    )
    one_process = held_bytes(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    lowbit.prepare_fsdp(model)  # the quantized state becomes parameters FSDP2 shards (before fully_shard)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **({"mp_policy": policy} if policy else {}))
    fully_shard(model, **({"mp_policy": policy} if policy else {}))
    sharded = held_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + rank)  # each rank its own windows
    times, losses = [], []
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()]).to(device)
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        times.append(time.perf_counter() - start)
        losses.append(mean_loss.item() / world)
        if rank == 0 and not args.json and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.3f}  {times[-1] * 1e3:.0f} ms", flush=True)
    summary = {
        "ranks": world,
        "scheme": args.scheme,
        "quantized_bytes_one_process": one_process[0],
        "quantized_bytes_per_rank": sharded[0],
        "model_bytes_per_rank": sharded[1],
        "peak_memory_mb": peak_memory_mb(device),
        "median_step_s": sorted(times[1:] or times)[len(times[1:] or times) // 2],
        "losses": losses,
    }
    per_rank = [None] * world
    dist.all_gather_object(per_rank, summary)
    if rank == 0:
        if args.json:
            print(json.dumps(per_rank))
        else:
            for r, s in enumerate(per_rank):
                print(f"rank {r}: quantized state {s['quantized_bytes_per_rank'] / 2**20:.1f} MiB "
                      f"(one process: {s['quantized_bytes_one_process'] / 2**20:.1f} MiB), parameters and buffers "
                      f"{s['model_bytes_per_rank'] / 2**20:.1f} MiB, peak memory {s['peak_memory_mb']:.0f} MiB, "
                      f"median step {s['median_step_s'] * 1e3:.0f} ms")  # fmt: skip


def worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    run(args)


def run(args):
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: the built-in SmolLM2-135M)")
    parser.add_argument("--scheme", choices=SCHEMES, default="nf4")
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn when not started by a launcher")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line with every rank's figures")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun / accelerate launch
        run(args)
        return
    default_model_directory(progress=not args.json)  # written once, before the ranks race for it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args.ranks, port, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
