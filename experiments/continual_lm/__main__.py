"""``python -m experiments.continual_lm``: see :mod:`.main`."""

from experiments.common import entry

if __name__ == "__main__":
  entry.run("experiments.continual_lm.main",
            "python -m experiments.continual_lm")
