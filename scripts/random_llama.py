"""A Llama with seeded random weights and an offline byte-level tokenizer, saved as a transformers model directory:
what tests and GPU checks load where no model hub is reachable.

    python scripts/random_llama.py DIR [--layers 4 --hidden 2048 --intermediate 5632 --heads 16 --kv-heads 4]
"""

from __future__ import annotations

import argparse

import torch


def byte_level_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens plus <s> and </s>. Every string round-trips, and
    nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def save_random_llama(directory, seed: int = 0, **config) -> None:
    """Build a LlamaForCausalLM from `config` (LlamaConfig fields; vocabulary and special tokens are the
    tokenizer's), seed its weights, and save it with the tokenizer to `directory`."""
    import transformers

    tokenizer = byte_level_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **config,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    args = parser.parse_args(argv)
    save_random_llama(args.directory, num_hidden_layers=args.layers, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)  # fmt: skip


if __name__ == "__main__":
    main()
