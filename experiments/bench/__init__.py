"""Benchmarks of ewc_jax: ratios measured in one process on one machine.

``python -m experiments.bench`` runs the suite (:mod:`.suite`);
``python -m experiments.bench --device-check --data-dir DIR`` runs the short
accelerator check (:mod:`.device_check`). Only the library's public API is
used, as a user would.
"""
