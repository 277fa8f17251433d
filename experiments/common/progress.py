"""Progress of a job of several trainings: one overall bar with an ETA, the
current phase's bar beneath it (tqdm).

A job (every method, lambda and seed of an experiment; every corpus of a
fine-tuning sequence) is a known number of optimiser steps. :class:`Job`
shows one bar over all of them, whose rate and ETA span the whole job, and
:meth:`Job.phase` the bar of the phase (a task) being trained, updating
both. Steps done before a restart (finished runs read back, a resumed run's
checkpoint) count as done without counting towards the rate
(:meth:`Job.skip`), so the ETA stays the time still needed.

Bars go to stderr, on a terminal only (``tqdm``'s ``disable=None``): a log
file or a pipe gets the log lines alone. While bars are shown on a
terminal, :meth:`Job.logging` routes the ``experiments`` loggers' lines
through ``tqdm.write``, so that a line never cuts through a bar.

Example::

  job = Job(total=3 * 100, desc="3 runs")
  for run in range(3):
    with job.phase(100, desc=f"run {run}") as bar:
      for _ in range(100):
        bar.update(1)
  job.close()
"""

import contextlib
import logging
import sys
from typing import Any, Iterator, Optional

from tqdm import auto as tqdm
from tqdm.contrib import logging as tqdm_logging


class _Phase:
  """A phase's bar; :meth:`update` advances the job's bar too."""

  def __init__(self, job: "Job", bar: Any):
    self._job, self._bar = job, bar

  def update(self, n: int) -> None:
    self._bar.update(n)
    self._job._bar.update(n)
    self._job._done += n


class Job:
  """The overall bar of a job; see the module docstring.

  Attributes:
    enabled: whether bars are shown (``False``: every call is cheap and
      prints nothing).
  """

  def __init__(self, total: Optional[int] = None, *, desc: str = "all runs",
               enabled: bool = True, unit: str = "step",
               file: Optional[Any] = None):
    """Opens the overall bar.

    Args:
      total: the job's steps; ``None`` until known (:meth:`set_total`).
      desc: the bar's label.
      enabled: show bars (on a terminal).
      unit: what a step is.
      file: write the bars there, terminal or not (default: stderr, on a
        terminal only).
    """
    self.enabled, self.unit, self._file = enabled, unit, file
    self._done = 0
    self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit, position=0,
                          leave=True, dynamic_ncols=file is None,
                          smoothing=0.05, file=file,
                          disable=self._disable())

  def _disable(self) -> Optional[bool]:
    if not self.enabled:
      return True
    return None if self._file is None else False

  @property
  def total(self) -> Optional[int]:
    return self._bar.total

  @property
  def done(self) -> int:
    """Steps done (or skipped) so far."""
    return self._done

  def set_total(self, total: int) -> None:
    """Sets the job's size once it is known."""
    self._bar.total = total
    self._bar.refresh()

  def set_description(self, desc: str) -> None:
    self._bar.set_description(desc)

  def skip(self, n: int) -> None:
    """Counts ``n`` steps done earlier (before a restart) as done, without
    counting them towards the rate and the ETA."""
    if n <= 0:
      return
    self._done += n
    if self._bar.disable:
      return
    self._bar.n += n
    self._bar.initial += n  # tqdm's average rate: (n - initial) / elapsed
    self._bar.last_print_n += n  # and its smoothed one: since the last print
    self._bar.refresh()

  @contextlib.contextmanager
  def phase(self, total: int, initial: int = 0,
            desc: str = "") -> Iterator[_Phase]:
    """The bar of one phase, beneath the job's; closed (and cleared) when
    the block ends.

    Args:
      total: the phase's steps.
      initial: steps of it done before a restart (they are :meth:`skip`
        ped on the job's bar).
      desc: the phase's label.
    """
    self.skip(initial)
    bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=self.unit,
                    position=1, leave=False, dynamic_ncols=self._file is None,
                    file=self._file, disable=self._disable())
    try:
      yield _Phase(self, bar)
    finally:
      bar.close()

  def logging(self) -> Any:
    """Within the block, the ``experiments`` loggers write through
    ``tqdm.write`` when bars are shown on a terminal; a no-op otherwise
    (so a closed pipe still stops the command, :mod:`cli`)."""
    shown = (self.enabled and self._file is None and not self._bar.disable
             and _isatty(sys.stdout) and _isatty(sys.stderr))
    if not shown:
      return contextlib.nullcontext()
    return tqdm_logging.logging_redirect_tqdm(
        loggers=[logging.getLogger("experiments")], tqdm_class=tqdm.tqdm)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "Job":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _isatty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False
