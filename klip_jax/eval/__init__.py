"""Evaluation: the evaluator registry (chosen in the config), the full benchmark (`klip eval`),
in-training evaluation, metrics with their chance levels, the report and its plots."""
