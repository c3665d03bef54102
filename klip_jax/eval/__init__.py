"""Downstream evaluation: benchmark tasks, metrics, report and plots."""
