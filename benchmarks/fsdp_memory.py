"""Per-rank memory of QLoRA under FSDP2 for Llama-3.1-70B, computed from lowbit's own layer sizes.

    python benchmarks/fsdp_memory.py [--seq-len 2048] [--rank 16]

Quantized bytes come from lowbit layers built on the meta device (exact: packed weight, scales, tables), split
into what prepare_fsdp shards and what stays whole on every rank. The rest is arithmetic, stated per row:
bf16 embeddings sharded like any weight, LoRA in float32 with its gradient and AdamW's two moments (16 bytes a
parameter, sharded), FSDP2's all-gather buffers for two decoder layers (the one computing and the one prefetched),
activations of one sequence with activation checkpointing per decoder layer (not sharded: every rank runs its own
batch), the largest linear dequantized to bf16 in backward, and 1 GiB of runtime (CUDA context, allocator slack).
24 GiB is an RTX 3090/4090; 78 GiB what torch reports for an 80 GB H100.
Measured figures for the built-in model are in BENCHMARKS.md (examples/fsdp_qlora.py).
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.fsdp import sharded_state_names

# Llama-3.1-70B's config.json (published): the shapes, nothing else, are used.
LLAMA_70B = dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256)
GiB = 2**30


def linear_shapes(c) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    h, i, kv = c["hidden"], c["intermediate"], c["kv_heads"] * c["head_dim"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def layer_bytes(in_features, out_features, config) -> tuple[int, int]:
    """(sharded, replicated) bytes of one lowbit layer's quantized state (bias-free, as in Llama)."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
        lowbit.replace_linears(model, config)  # empty layers: the buffers a loaded one fills, at their sizes
    layer = model[0]
    sharded_names = sharded_state_names(layer)
    sharded = replicated = 0
    for name, t in layer.named_buffers():
        size = t.numel() * t.element_size()
        if name in sharded_names:
            sharded += size
        else:
            replicated += size
    return sharded, replicated


def table(c, schemes, ranks, seq_len, lora_rank) -> str:
    shapes = linear_shapes(c)
    h, layers = c["hidden"], c["layers"]
    lora_params = layers * sum(lora_rank * (i + o) for i, o in shapes)
    embeddings = 2 * c["vocab"] * h * 2  # input embedding and lm_head, bf16, untied
    # Checkpointed activations: each layer's input (bf16) kept; one layer recomputed at a time (its q, k, v, attention
    # output, o, gate, up, activation and down intermediates, bf16); the logits and their gradient in float32.
    kv = c["kv_heads"] * c["head_dim"]
    activations = (layers * seq_len * h * 2 + seq_len * (4 * h + 2 * kv + 4 * c["intermediate"]) * 2
                   + 2 * seq_len * c["vocab"] * 4)  # fmt: skip
    dequantized = max(i * o for i, o in shapes) * 2
    runtime = GiB
    rows = ["| scheme | ranks | quantized (sharded + whole) | embeddings | LoRA + grads + AdamW | all-gather buffers "
            "| activations | dequantized W | runtime | **total per rank** | fits 24 GiB | fits 78 GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, config in schemes.items():
        per_layer = [layer_bytes(i, o, config) for i, o in shapes]
        sharded = layers * sum(s for s, _ in per_layer)
        whole = layers * sum(r for _, r in per_layer)
        gathered = 2 * sum(s for s, _ in per_layer)
        for n in ranks:
            parts = [sharded / n + whole, embeddings / n, 16 * lora_params / n, gathered, activations, dequantized, runtime]
            total = sum(parts)
            cells = " | ".join(f"{p / GiB:.1f}" for p in parts)
            rows.append(f"| {name} | {n} | {cells} | **{total / GiB:.1f}** | {'yes' if total <= 24 * GiB else 'no'} "
                        f"| {'yes' if total <= 78 * GiB else 'no'} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, on every linear layer")
    args = parser.parse_args(argv)
    schemes = {
        "nf4": lowbit.LowbitConfig(load_in_4bit=True),
        "nf4-dq": lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True),
    }
    print(f"Llama-3.1-70B, QLoRA r={args.rank} on every linear layer, one sequence of {args.seq_len} tokens a rank, "
          "GiB per rank:\n")  # fmt: skip
    print(table(LLAMA_70B, schemes, [1, 2, 4, 8], args.seq_len, args.rank))


if __name__ == "__main__":
    main()
