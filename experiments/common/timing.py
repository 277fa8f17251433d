"""Where a run's time goes: wall time per phase, compilation split out.

A :class:`PhaseTimer` adds up the wall time of named phases (``train``,
``fisher``, ``eval``, ``checkpoint``, ...). JAX reports every tracing,
lowering and XLA compilation through ``jax.monitoring``; the time those
take inside a phase is moved from that phase to ``compile``, so ``train``
is the training itself. JAX dispatches work asynchronously: a phase that
only enqueues device work must end with the caller blocking on its result
(``jax.block_until_ready``), or its time shows up in the next phase.
"""

import contextlib
import threading
import time
from typing import Iterator

import jax

# "other" is what the caller measures outside every phase (model init, data
# on device, checkpoint restore), see PhaseTimer.finish.
# The jax.monitoring events that together make up a compilation.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PHASES = ("compile", "train", "fisher", "eval", "checkpoint", "other")

_local = threading.local()
_listening = False


def _on_event(name: str, seconds: float, **unused) -> None:
  timer = getattr(_local, "timer", None)
  if timer is not None and name in COMPILE_EVENTS:
    timer.compile_seen += seconds


def _listen() -> None:
  global _listening
  if not _listening:  # a listener cannot be removed: register it once
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    _listening = True


class PhaseTimer:
  """Accumulates seconds per phase; compilation is reported as ``compile``.

  Example::

    timer = PhaseTimer()
    with timer.phase("train"):
      state = jax.block_until_ready(train(state))
    timer.seconds  # {"compile": ..., "train": ..., "fisher": 0.0, ...}
  """

  def __init__(self):
    self.seconds = {name: 0.0 for name in PHASES}
    self.compile_seen = 0.0
    self._frames: list[dict[str, float]] = []

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Times the block as phase ``name``.

    Compilation within it counts as ``compile``; a phase nested in another
    (a checkpoint within training) is taken out of the outer one.
    """
    _listen()
    outer = getattr(_local, "timer", None)
    _local.timer = self
    frame = {"seen": self.compile_seen, "time": 0.0, "compile": 0.0}
    parent = self._frames[-1] if self._frames else None
    self._frames.append(frame)
    start = time.perf_counter()
    try:
      yield
    finally:
      total = time.perf_counter() - start
      self._frames.pop()
      all_compile = self.compile_seen - frame["seen"]
      own = total - frame["time"]
      compiled = min(max(all_compile - frame["compile"], 0.0), own)
      self.seconds["compile"] += compiled
      self.seconds[name] = self.seconds.get(name, 0.0) + own - compiled
      if parent is not None:
        parent["time"] += total
        parent["compile"] += all_compile
      _local.timer = outer

  def add(self, other: dict[str, float]) -> None:
    """Adds another breakdown (e.g. from before a restart)."""
    for name, value in other.items():
      self.seconds[name] = self.seconds.get(name, 0.0) + float(value)

  def finish(self, total: float) -> dict[str, float]:
    """The breakdown with ``other = total - sum(phases)``, rounded.

    Args:
      total: the wall time the phases are part of.
    """
    seconds = {k: v for k, v in self.seconds.items() if k != "other"}
    seconds["other"] = max(total - sum(seconds.values()), 0.0)
    return {name: round(value, 3) for name, value in seconds.items()}

  def rounded(self) -> dict[str, float]:
    """The breakdown rounded to milliseconds (for JSON)."""
    return {name: round(value, 3) for name, value in self.seconds.items()}
