"""Pieces every experiment shares: atomic result files, continual-learning
metrics, plots, run checkpoints, phase timing, live metrics (TensorBoard,
W&B) and command-line helpers."""
