"""Integrations with other libraries: `transformers` (the "lowbit" quantization method)."""
