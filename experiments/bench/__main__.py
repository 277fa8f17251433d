"""``python -m experiments.bench``: the suite, or ``--device-check``."""

from experiments.bench.suite import main

if __name__ == "__main__":
  main()
