"""Data: the synthetic SAR world, knowledge text, records, datasets, tokenizer, pipelines."""
