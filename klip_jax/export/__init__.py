"""Hugging Face transformers BLIP export and import (`klip export`, `klip import-hf`).

`hf` holds the config translation and the tensor mapping (numpy only); `commands` holds the
workdir-level functions the CLI calls. torch / transformers / safetensors (the `export` extra)
are imported only inside the functions that need them.
"""
