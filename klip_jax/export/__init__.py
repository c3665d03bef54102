"""Hugging Face transformers BLIP export and import (`klip export`, `klip import-hf`).

`hf` holds the config translation and the tensor mapping (numpy only); `commands` holds the
workdir-level functions the CLI calls; `processor` what a PyTorch user needs beside the weights
(tokenizer, SAR processor, sample chips, example), shipping `processing_klip.py` and
`pytorch_example.py` (read as text, never imported here; they import no klip_jax). torch /
transformers / safetensors (the `export` extra) are imported only inside the functions that
need them.
"""
