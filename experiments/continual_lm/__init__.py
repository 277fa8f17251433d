"""Continual fine-tuning of a Qwen3 language model with EWC (tunix's model).

``python -m experiments.continual_lm --help`` lists every setting. Modules:
``config`` (settings, presets), ``corpora`` (offline texts), ``tokenizer``
(byte-level BPE), ``family`` (Qwen3 on tunix: Hugging Face checkpoints in
and out), ``trainer`` (the training loop on ewc_jax's pieces),
``sequences`` (the corpora as token windows), ``workdir`` (the run
directory, for resume), ``experiment`` (the phases, with the runner's
progress bars: ``experiments.common.progress``), ``results`` (files),
``main`` (the command line).
"""
