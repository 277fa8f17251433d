"""Command-line helpers shared by the experiments: logging and list flags.

The experiments report through :mod:`logging` (logger names under
``experiments``); only a command line installs a handler
(:func:`logging_to_stdout`), so a library user or a notebook decides what is
shown.

A closed standard output (the reader of a pipe ended, as in ``... | head
-1``) stops the command: the handler raises :class:`OutputClosed` from the
logging call, the run unwinds as after Ctrl-C (checkpoints finished,
resumable), and the command says so in one line on stderr, never with
logging's "--- Logging error ---" tracebacks.
"""

import contextlib
import dataclasses
import io
import logging
import pathlib
import sys
import typing
from typing import Any, Iterator, Optional, Sequence

import tyro

from experiments.common import tracking
from experiments.common.entry import OutputClosed  # noqa: F401 (re-exported)


class _Handler(logging.StreamHandler):
  """A stream handler that stops the command on a closed pipe."""

  def handleError(self, record: logging.LogRecord) -> None:
    if isinstance(sys.exc_info()[1], BrokenPipeError):
      raise OutputClosed("standard output was closed") from None
    super().handleError(record)


def print_out(text: str) -> None:
  """Prints ``text`` on stdout; a closed pipe raises :class:`OutputClosed`."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    raise OutputClosed("standard output was closed") from None


def tyro_cli(cls: Any, *, prog: str, **kwargs: Any) -> Any:
  """``tyro.cli(cls, prog=prog, **kwargs)`` whose errors are one line.

  tyro draws a bad flag's error in a box of several lines (the message,
  the flag's help, a pointer to ``--help``); that is turned into one line
  on stderr, ``PROG: error: <message>`` (the flag's help stays in
  ``--help``), and ``SystemExit(2)`` as before. ``--help`` itself is
  unchanged.
  """
  captured = io.StringIO()
  try:
    with contextlib.redirect_stderr(captured):
      return tyro.cli(cls, prog=prog, **kwargs)
  except SystemExit as e:
    text = captured.getvalue()
    if e.code not in (0, None) and text.strip():
      print(f"{prog}: error: {tyro_message(text)}", file=sys.stderr)
    else:
      sys.stderr.write(text)
    raise


def tyro_message(text: str) -> str:
  """The message of a tyro error, as one line.

  tyro (rich) draws it in a box on a terminal, ``title`` in the top edge,
  and without a frame elsewhere (a title line, then the blocks between
  rules); either way the blocks are the message, the flag's help and a
  pointer to ``--help``: the message is kept.
  """
  blocks, block, framed = [], [], False
  for raw in text.splitlines():
    line = raw.strip()
    if line[:1] in ("\u256d", "\u2570", "+"):  # a box's top or bottom
      framed = True
      continue
    if line[:1] in ("\u2502", "|"):
      line = line[1:]
    if line[-1:] in ("\u2502", "|"):
      line = line[:-1]
    line = line.strip()
    if line and set(line) <= {"\u2500", "-"}:  # a rule between blocks
      blocks.append(block)
      block = []
    elif line:
      block.append(line)
  blocks = [b for b in blocks + [block] if b]
  if not framed and len(blocks) > 1 and len(blocks[0]) == 1:
    blocks = blocks[1:]  # the title line of an unframed error
  message = " ".join(blocks[0]) if blocks else text
  return " ".join(message.split())


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
  handler = _Handler(sys.stdout)
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
    quiet: print the results and errors only (no progress bars, no
      messages but warnings).
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
      ValueError: ``--quiet`` with ``--verbose``; ``--logdir`` names a file
        (or a path under one).
    """
    if self.quiet and self.verbose:
      raise ValueError("--quiet and --verbose exclude each other: give one "
                       "of them.")
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
