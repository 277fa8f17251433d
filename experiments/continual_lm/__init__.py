"""Continual fine-tuning of a byte-level language model with EWC.

``python -m experiments.continual_lm --help`` lists every setting. Modules:
``config`` (settings, presets), ``corpora`` (offline texts), ``model`` (the
transformer), ``trainer`` (the training loop with held-out evaluations),
``experiment`` (the run), ``results`` (files), ``main`` (the command line).
"""
