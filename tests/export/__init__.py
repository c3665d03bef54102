"""Export tests. Each module skips as a whole where transformers/torch are missing, for this reason."""

NO_EXPORT = "the Hugging Face export and its parity need the export extra: pip install -e '.[export]'"
