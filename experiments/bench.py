"""``python -m experiments.bench``: see :mod:`experiments.benchmarks`."""

from experiments.benchmarks.common import mlp  # noqa: F401 (older scripts)
from experiments.benchmarks.suite import main

if __name__ == "__main__":
  main()
