"""Pieces every experiment shares: atomic result files, continual-learning
metrics, plots, run checkpoints, phase timing and command-line helpers."""
