"""Test-only entry point: the experiment's CLI, killed by SIGKILL mid-run.

``python -m tests.experiments.crash_entry STEPS ARGS...`` runs ``python -m
experiments.permuted_mnist ARGS...`` and kills its own process (as a crash or
a pre-emption would) at the first chunk boundary after ``STEPS`` optimiser
steps over all its runs.
"""

import os
import signal
import sys

from experiments.permuted_mnist import main


def crash_after(limit: int):
  done = [0]

  def on_chunk(steps: int) -> None:
    done[0] += steps
    if done[0] >= limit:
      os.kill(os.getpid(), signal.SIGKILL)

  return on_chunk


if __name__ == "__main__":
  sys.exit(main.main(sys.argv[2:], on_chunk=crash_after(int(sys.argv[1]))))
