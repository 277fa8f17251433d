"""Kept for older imports: the atomic writers live in
:mod:`experiments.common.files`."""

from experiments.common.files import write_atomic  # noqa: F401

__all__ = ["write_atomic"]
