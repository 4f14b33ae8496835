"""Does a LoRA adapter trained on top of NF4 win back what quantization cost? Measured, not assumed.

    python examples/qlora_recovery.py                       # built-in SmolLM2-135M, minutes on a 2-core CPU
    python examples/qlora_recovery.py --model DIR --steps 5  # any local causal LM

Full precision, NF4, NF4 + LoRA and, as a control, full precision + the same LoRA training are scored on
the text `lowbit compare` evaluates by default (the first --eval-tokens tokens of CPython's pydoc topics).
The adapters train on other passages of the same document (the tokens after a gap), never on the evaluation
text. Because training and evaluation text share a domain, part of any gain is adaptation to that domain,
not recovery: the full-precision + LoRA row measures that part.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model

import lowbit
from lowbit.compare.data import default_text, strided_windows
from lowbit.compare.evaluate import evaluate_reference
from lowbit.compare.models import load_full_precision

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perplexity(model, ids, context) -> float:
    model.eval()
    evaluation, _ = evaluate_reference(model, ids, strided_windows(len(ids), context, context // 2))
    return evaluation.perplexity


def train_lora(model, train_ids, steps, seq_len, batch_size, lr, seed):
    """LoRA (r 16 on every projection) trained with AdamW on random windows of train_ids; returns the model."""
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}", flush=True)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model directory (default: the built-in SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--train-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    loaded = load_full_precision(args.model)
    ids = torch.tensor(loaded.tokenizer(default_text()).input_ids)
    gap = 2 * args.context  # keep training windows well away from the evaluated passage
    eval_ids = ids[: args.eval_tokens]
    train_ids = ids[args.eval_tokens + gap : args.eval_tokens + gap + args.train_tokens]
    full = loaded.model
    full.requires_grad_(False)

    rows = []

    def record(name, model, seconds=None):
        rows.append((name, perplexity(model, eval_ids, args.context), seconds))
        print(f"{name}: perplexity {rows[-1][1]:.3f}", flush=True)

    record("full precision", full)
    nf4 = lowbit.quantize_model(copy.deepcopy(full), lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    record("nf4", nf4)
    for name, base in (("nf4 + LoRA", nf4), ("full precision + LoRA (control)", copy.deepcopy(full))):
        print(f"training {name}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens", flush=True)
        start = time.perf_counter()
        tuned = train_lora(base, train_ids, args.steps, args.seq_len, args.batch_size, args.lr, args.seed)
        record(name, tuned, time.perf_counter() - start)

    reference = rows[0][1]
    print(f"\n{loaded.name}; perplexity on {len(eval_ids)} tokens of CPython's pydoc topics "
          f"(context {args.context}); LoRA r=16 on {', '.join(TARGETS)}, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens, lr {args.lr}\n")  # fmt: skip
    print("| model | perplexity | Δ vs full precision | training |")
    print("|---|---|---|---|")
    for name, ppl, seconds in rows:
        trained = "—" if seconds is None else f"{seconds:.0f} s"
        print(f"| {name} | {ppl:.3f} | {ppl / reference - 1:+.2%} | {trained} |")


if __name__ == "__main__":
    main()
