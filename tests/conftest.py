"""Shared test setup: float32 on CPU, strict numerics warnings."""

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")
