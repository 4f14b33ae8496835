"""End to end on a GPU: decode and prefill of a Llama-3.1-8B-shaped model (random weights, built from its config)
in bf16, NF4 and LLM.int8(), all in one run so the ratios compare like with like.

    python benchmarks/bench_e2e_cuda.py --out DIR            # scripts/gpu_check.sh runs it
    python benchmarks/bench_e2e_cuda.py --tiny --device cpu  # rehearsal: a 2-layer model, any device

Decode: batch 1, a 32-token prompt, then `--new-tokens` greedy steps through a static KV cache; tokens per second
eager, and with the step under torch.compile(mode="reduce-overhead") (CUDA graphs: no per-launch host cost), whose
compile time is reported apart. Prefill: one forward of `--prefill` tokens. Medians of `--repeats`. Writes
bench_e2e.json (after each model) and bench_e2e.md, a table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import lowbit

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)  # fmt: skip
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096)  # fmt: skip
SCHEMES = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
           "int8": dict(load_in_8bit=True)}  # fmt: skip


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_seconds_per_token(model, prompt, new_tokens, compiled: bool) -> tuple[float, float]:
    """(median seconds per decode step, seconds spent before the timed steps: prefill, and compiling)."""
    device = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        step = model.forward
        if compiled:
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        times = []
        for i in range(new_tokens):
            position = torch.tensor([[prompt.shape[1] + i]], device=device)
            synchronize(device)
            t = time.perf_counter()
            logits = step(input_ids=token, past_key_values=cache, position_ids=position,
                          cache_position=position[0], use_cache=True).logits  # fmt: skip
            token = logits[:, -1:].argmax(-1)
            synchronize(device)
            times.append(time.perf_counter() - t)
    warm = 3 if compiled else 1  # compiled: the first calls trace, compile and record graphs
    setup = time.perf_counter() - start - sum(times[warm:])
    return statistics.median(times[warm:]), setup


def prefill_seconds(model, tokens: int, repeats: int, device) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            synchronize(device)
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            synchronize(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def measure(name, model, args, device) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    row = {"model": name, "weight_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(),
                                                                                     *model.buffers()])}  # fmt: skip
    row["decode_s"], _ = decode_seconds_per_token(model, prompt, args.new_tokens, compiled=False)
    if args.compile:
        try:
            row["decode_graphs_s"], row["compile_s"] = decode_seconds_per_token(model, prompt, args.new_tokens, True)
        except Exception as e:  # a failure to compile is a finding, not the end of the run
            row["decode_graphs_error"] = f"{type(e).__name__}: {e}"[:500]
    row["prefill_s"] = prefill_seconds(model, args.prefill, args.repeats, device)
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (rehearsal)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_8B))
    torch.manual_seed(0)
    with device:
        bf16 = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    os.makedirs(args.out, exist_ok=True)
    rows = []

    def record(row):  # written after each model: a run cut short by its time limit keeps what it measured
        rows.append(row)
        with open(os.path.join(args.out, "bench_e2e.json"), "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "lowbit": lowbit.__version__}, f, indent=1)

    record(measure("bf16", bf16, args, device))
    for name, options in SCHEMES.items():
        quantized = lowbit.quantize_model(copy.deepcopy(bf16), lowbit.LowbitConfig(**options))
        record(measure(name, quantized, args, device))
        del quantized
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    lines = [f"{'Llama-3.1-8B-shaped' if not args.tiny else 'tiny'} random model on "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}, torch {torch.__version__}, "
             f"{datetime.date.today()}: decode batch 1 (tokens/s), prefill {args.prefill} tokens (tokens/s)", "",
             "| model | weights GB | decode eager | decode CUDA graphs | prefill |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        graphs = (f"{1 / r['decode_graphs_s']:.1f} ({base['decode_graphs_s'] / r['decode_graphs_s']:.2f}×)"
                  if "decode_graphs_s" in r and "decode_graphs_s" in base else r.get("decode_graphs_error", "—")[:60])  # fmt: skip
        lines.append(f"| {r['model']} | {r['weight_bytes'] / 1e9:.2f} | {1 / r['decode_s']:.1f} "
                     f"({base['decode_s'] / r['decode_s']:.2f}×) | {graphs} | {args.prefill / r['prefill_s']:.0f} "
                     f"({base['prefill_s'] / r['prefill_s']:.2f}×) |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "bench_e2e.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
