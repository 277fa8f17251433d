"""``python -m experiments.permuted_mnist``: see :mod:`main`."""

from experiments.common import entry

if __name__ == "__main__":
  entry.run("experiments.permuted_mnist.main",
            "python -m experiments.permuted_mnist")
