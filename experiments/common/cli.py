"""Command-line helpers shared by the experiments: logging and list flags.

The experiments report through :mod:`logging` (logger names under
``experiments``); only a command line installs a handler
(:func:`logging_to_stdout`), so a library user or a notebook decides what is
shown.
"""

import contextlib
import dataclasses
import logging
import pathlib
import sys
import typing
from typing import Any, Iterator, Optional, Sequence

from experiments.common import tracking

@contextlib.contextmanager
def logging_to_stdout(quiet: bool = False,
                      verbose: bool = False) -> Iterator[None]:
  """Within the block, the ``experiments`` loggers' messages go to stdout.

  The logger's handler, level and propagation are restored afterwards, so
  a command called from Python (a test, a notebook) leaves logging as it
  found it.

  Args:
    quiet: only warnings and errors.
    verbose: debug messages too.
  """
  logger = logging.getLogger("experiments")
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(message)s"))
  saved = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.WARNING if quiet
                  else logging.DEBUG if verbose else logging.INFO)
  logger.propagate = False  # no second copy through the root's handlers
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def split_commas(argv: Sequence[str], list_flags: Sequence[str]) -> list[str]:
  """Lets list flags take comma lists (``--seeds 0,1,2``) as well as
  space-separated ones (``--seeds 0 1 2``).

  Args:
    argv: the command line.
    list_flags: flags whose values are lists, e.g. ``"--seeds"``.

  Returns:
    ``argv`` with each comma list after one of ``list_flags`` split into
    separate words.
  """
  out, in_list = [], False
  for word in argv:
    if word.startswith("--"):
      flag, sep, value = word.partition("=")
      in_list = flag in list_flags
      if sep and in_list:
        out += [flag, *[v for v in value.split(",") if v]]
        continue
      out.append(word)
    elif in_list and "," in word:
      out += [v for v in word.split(",") if v]
    else:
      out.append(word)
  return out


def list_flags(cls: Any) -> list[str]:
  """The flags of ``cls``'s tuple-valued dataclass fields (``--seeds``),
  for :func:`split_commas`."""
  hints = typing.get_type_hints(cls, include_extras=False)
  return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
          if typing.get_origin(hints[f.name]) is tuple]


@dataclasses.dataclass(frozen=True)
class OutputFlags:
  """Flags every experiment shares: messages and live metrics.

  Attributes:
    quiet: only warnings and errors.
    verbose: debug messages too.
    logdir: write live TensorBoard event files here, one subdirectory per
      run (``tensorboard --logdir DIR`` shows them).
    wandb: log each run to Weights & Biases too (needs ``wandb``).
    wandb_project: the W&B project of --wandb.
  """

  quiet: bool = False
  verbose: bool = False
  logdir: Optional[str] = None
  wandb: bool = False
  wandb_project: str = "ewc_jax"

  def check(self) -> None:
    """Fails before any work where a chosen writer is not installed.

    Raises:
      ImportError: ``--wandb`` without ``wandb``.
      ValueError: ``--logdir`` names a file (or a path under one).
    """
    if self.wandb:
      tracking.import_wandb()
    if self.logdir is not None:
      path = pathlib.Path(self.logdir)
      while not path.exists() and path != path.parent:
        path = path.parent
      if path.exists() and not path.is_dir():
        raise ValueError(f"--logdir {self.logdir}: {path} is a file, not a "
                         "directory; choose another --logdir.")

  def live(self) -> Optional[dict[str, Optional[str]]]:
    """``{"logdir", "wandb_project"}`` where live metrics are asked for,
    else ``None``."""
    if self.logdir is None and not self.wandb:
      return None
    return {"logdir": self.logdir,
            "wandb_project": self.wandb_project if self.wandb else None}

  def logging(self):
    """:func:`logging_to_stdout` at the chosen verbosity."""
    return logging_to_stdout(quiet=self.quiet, verbose=self.verbose)
