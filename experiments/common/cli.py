"""Command-line helpers shared by the experiments: logging and list flags.

The experiments report through :mod:`logging` (logger names under
``experiments``); only a command line installs a handler
(:func:`setup_logging`), so a library user or a notebook decides what is
shown.
"""

import logging
import sys
from typing import Optional, Sequence

_handler: Optional[logging.Handler] = None


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
  """Sends the ``experiments`` loggers' messages to stdout.

  Args:
    quiet: only warnings and errors.
    verbose: debug messages too.
  """
  global _handler
  logger = logging.getLogger("experiments")
  if _handler is not None:  # a second main() in one process: replace it
    logger.removeHandler(_handler)
  _handler = logging.StreamHandler(sys.stdout)
  _handler.setFormatter(logging.Formatter("%(message)s"))
  logger.addHandler(_handler)
  logger.setLevel(logging.WARNING if quiet
                  else logging.DEBUG if verbose else logging.INFO)
  logger.propagate = False


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
