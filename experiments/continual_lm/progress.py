"""Progress of a whole job: one overall bar with an ETA, the phase's beneath.

The job is a list of phases, each with a size in work units (optimiser
steps; a Fisher pass counts its sequences divided by its chunk size), known
up front, so the overall bar's ETA covers every phase still to come. Bars
are drawn with ``tqdm`` on stderr when it is a terminal; elsewhere (logs,
CI, tests) nothing is drawn and each phase's start and end go to
``logging`` instead, so that no minute passes silently in either.

Kept in the experiment (not ``experiments/common``) for now: the MNIST
runner is getting its own overall bar, and the two are to be merged.
"""

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)


class Progress:
  """Two bars: the job (``total`` units, ETA) and the current phase.

  Args:
    total: the job's work units.
    enabled: draw bars; None: where stderr is a terminal.
  """

  def __init__(self, total: int, *, enabled: Optional[bool] = None):
    self.total = max(int(total), 1)
    self.done = 0
    self._start = time.perf_counter()
    if enabled is None:
      enabled = sys.stderr.isatty()
    self._overall = None
    self._phase = None
    if enabled:
      from tqdm.auto import tqdm  # noqa: PLC0415 (in the lock)
      self._tqdm = tqdm
      self._overall = tqdm(total=self.total, desc="job", unit="step",
                           position=0, leave=True, dynamic_ncols=True,
                           smoothing=0.05, file=sys.stderr)

  @contextlib.contextmanager
  def phase(self, name: str, units: int) -> Iterator[Callable[[int], None]]:
    """A phase of ``units``; yields ``advance(n)``.

    Whatever of ``units`` was not advanced is counted done at the end (a
    phase skipped on resume, or shorter than planned), so the overall bar
    stays true.
    """
    units = max(int(units), 0)
    seen = [0]
    started = time.perf_counter()
    logger.info("%s ...", name)
    if self._overall is not None:
      self._phase = self._tqdm(total=max(units, 1), desc=name, unit="step",
                               position=1, leave=False, dynamic_ncols=True,
                               file=sys.stderr)

    def advance(n: int) -> None:
      n = max(min(int(n), units - seen[0]), 0)
      seen[0] += n
      self._add(n)

    try:
      yield advance
    finally:
      advance(units - seen[0])
      if self._phase is not None:
        self._phase.close()
        self._phase = None
      logger.info("%s: done in %.1f s (job %.0f%%, %.0f s so far)", name,
                  time.perf_counter() - started,
                  100.0 * self.done / self.total,
                  time.perf_counter() - self._start)

  def note(self, text: str) -> None:
    """A short status beside the job bar (e.g. ``compiling``)."""
    if self._overall is not None:
      self._overall.set_postfix_str(text, refresh=True)

  def _add(self, n: int) -> None:
    self.done += n
    if self._overall is not None and n:
      self._overall.update(n)
      if self._phase is not None:
        self._phase.update(n)

  def close(self) -> None:
    if self._phase is not None:
      self._phase.close()
    if self._overall is not None:
      self._overall.close()
      self._overall = None
