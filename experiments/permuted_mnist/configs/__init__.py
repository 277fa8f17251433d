"""Presets: one module per preset, each with ``get_config() -> Config``.

Each opens with the paper, the command and the expected runtime; measured
results live in the README, not here.
"""
