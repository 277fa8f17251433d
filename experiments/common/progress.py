"""Progress of a job of several trainings: one overall bar with an ETA, the
current phase's bar beneath it (tqdm).

A job (every method, lambda and seed of an experiment; every phase of the
language-model study) is a known number of optimiser steps. :class:`Job`
shows one bar over all of them, whose rate and ETA span the whole job, and
:meth:`Job.phase` the bar of the phase (a task) being trained, updating
both. Steps done before a restart (finished runs read back, a resumed run's
checkpoint) count as done without counting towards the rate
(:meth:`Job.skip`), so the ETA stays the time still needed; so do the
steps a phase planned but did not take (a phase kept from an earlier
attempt, or shorter than planned), counted when it ends.

Bars go to stderr, on a terminal only (``tqdm``'s ``disable=None``): a log
file or a pipe gets the log lines alone. While bars are shown on a
terminal, :meth:`Job.logging` routes the ``experiments`` loggers' lines
through ``tqdm.write``, so that a line never cuts through a bar. With
``log=True`` a phase also logs its start and its end (seconds, the job's
share done): a log file or a pipe then sees no minute pass in silence.

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
import time
from typing import Any, Iterator, Optional

from tqdm import auto as tqdm
from tqdm.contrib import logging as tqdm_logging

logger = logging.getLogger(__name__)


class _Phase:
  """A phase's bar; :meth:`update` advances the job's bar too (never past
  the phase's size, so the job's bar stays true)."""

  def __init__(self, job: "Job", bar: Any, left: int):
    self._job, self._bar, self.left = job, bar, left

  def update(self, n: int) -> None:
    n = max(min(int(n), self.left), 0)
    if not n:
      return
    self.left -= n
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
    self._start = time.perf_counter()
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
  def phase(self, total: int, initial: int = 0, desc: str = "",
            log: bool = False) -> Iterator[_Phase]:
    """The bar of one phase, beneath the job's; closed (and cleared) when
    the block ends. Steps of it not taken by then count as done (without
    counting towards the rate).

    Args:
      total: the phase's steps.
      initial: steps of it done before a restart (they are :meth:`skip`
        ped on the job's bar).
      desc: the phase's label.
      log: log the phase's start and end (``desc ...``, ``desc: done in
        S s (job P%, T s so far)``).
    """
    total, initial = max(int(total), 0), min(max(int(initial), 0), total)
    self.skip(initial)
    started = time.perf_counter()
    if log:
      logger.info("%s ...", desc)
    bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=self.unit,
                    position=1, leave=False, dynamic_ncols=self._file is None,
                    file=self._file, disable=self._disable())
    phase = _Phase(self, bar, total - initial)
    try:
      yield phase
    finally:
      bar.close()
    self.skip(phase.left)
    if log:
      share = 100.0 * self._done / self.total if self.total else 100.0
      logger.info("%s: done in %.1f s (job %.0f%%, %.0f s so far)", desc,
                  time.perf_counter() - started, share,
                  time.perf_counter() - self._start)

  def note(self, text: str) -> None:
    """A short status beside the job's bar (e.g. the model's size)."""
    if not self._bar.disable:
      self._bar.set_postfix_str(text, refresh=True)

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
