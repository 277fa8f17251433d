"""``python -m experiments.permuted_mnist``: see :mod:`main`."""

import sys

from experiments.permuted_mnist import main

if __name__ == "__main__":
  sys.exit(main.main())
