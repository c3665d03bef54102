"""Scaling-law sweeps: the fits of a sweep table (fit), its plots and its report."""
