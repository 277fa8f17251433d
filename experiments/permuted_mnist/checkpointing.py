"""A run's checkpoints: where it stands (:class:`Record`) and its arrays.

The saved tree is ``{"state": State, "key": key_data}`` (stacked over the
members of a vmapped group); ``meta`` holds the :class:`Record`, the run's
identity (method, members, data seed) and the resolved config, which a
restore checks. Files: :mod:`experiments.common.checkpoint` (orbax).
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from experiments.common import checkpoint as checkpoint_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import steps


class TrainingDiverged(FloatingPointError):
  """The training loss (or a state to checkpoint) became nan or inf."""


@dataclasses.dataclass
class Record:
  """Where a run of K members stands, besides its arrays.

  Attributes:
    R: test accuracy ``[K, T, T]``: ``R[k, i, j]`` on task ``j`` after task
      ``i``, member ``k``.
    R_val: the same on the validation splits.
    b: the initial model's test accuracy ``[K, T]``.
    b_val: the same on the validation splits.
    train_loss: per member, per finished phase, each chunk's mean loss.
    task_loss: per member, the chunks of the current phase so far.
    task: the next phase to train (all done: the number of phases).
    step: the next step within it.
    time_s: wall time so far.
    timing: seconds per phase kind so far (``experiments.common.timing``).
  """

  R: np.ndarray
  R_val: np.ndarray
  b: np.ndarray
  b_val: np.ndarray
  train_loss: list[list[list[float]]]
  task_loss: list[list[float]]
  task: int = 0
  step: int = 0
  time_s: float = 0.0
  timing: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    # Copies throughout: a background write must not see later changes.
    return {"R": self.R.tolist(), "R_val": self.R_val.tolist(),
            "b": self.b.tolist(), "b_val": self.b_val.tolist(),
            "train_loss": [[list(c) for c in m] for m in self.train_loss],
            "task_loss": [list(m) for m in self.task_loss],
            "task": self.task, "step": self.step, "time_s": self.time_s,
            "timing": dict(self.timing)}

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> "Record":
    arrays = {k: np.asarray(meta[k], np.float64)
              for k in ("R", "R_val", "b", "b_val")}
    return cls(**arrays, train_loss=meta["train_loss"],
               task_loss=meta["task_loss"], task=meta["task"],
               step=meta["step"], time_s=meta["time_s"],
               timing=meta.get("timing", {}))


def describe(diff: Sequence[tuple[str, Any, Any]]) -> str:
  """``field: saved X, now Y; ...`` for :func:`config.differences`."""
  show = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
  return "; ".join(f"{name}: saved {show(a)!r}, now {show(b)!r}"
                   for name, a, b in diff)


class RunCheckpointer:
  """Saves and restores one run's (or vmapped group's) checkpoints.

  Args:
    directory: the run's own checkpoint directory.
    config: the resolved configuration (saved, and checked on restore).
    method: the method's name.
    points: ``(lam, seed)`` of each member.
    data_seed: the seed of the task stream.
    totals: each phase's number of steps (a checkpoint's global step).
    desc: ``desc(phase)`` names the run in errors.
  """

  def __init__(self, directory: Any, config: config_lib.Config, method: str,
               points: Sequence[tuple[float, int]], data_seed: int,
               totals: Sequence[int], desc: Callable[[int], str]):
    self.store = checkpoint_lib.RunCheckpoints(directory)
    self.config, self.totals, self.desc = config, list(totals), desc
    self.identity = {"method": method,
                     "members": [[float(lam), int(s)] for lam, s in points],
                     "data_seed": int(data_seed)}

  def save(self, state: steps.State, key: jax.Array, record: Record) -> None:
    """Writes a checkpoint, refusing a state that holds nan or inf."""
    arrays, paths = checkpoint_lib.flatten(
        {"state": state, "key": jax.random.key_data(key)})
    for path, x in zip(paths, arrays.values(), strict=True):
      if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
        raise TrainingDiverged(
            f"{self.desc(record.task)}: {path} holds nan or inf after step "
            f"{record.step}; not checkpointed (the last good checkpoint is "
            "kept).")
    step = sum(self.totals[:record.task]) + record.step
    self.store.save(step, arrays, {
        **self.identity, "config": self.config.to_json(), "paths": paths,
        **record.to_json()})

  def restore(self, state: steps.State, key: jax.Array
              ) -> Optional[tuple[steps.State, jax.Array, Record]]:
    """The latest checkpoint, or ``None`` when there is none.

    Raises:
      ValueError: the checkpoint belongs to another run or config.
    """
    if self.store.latest_step() is None:
      return None
    tree, meta = self.store.restore(
        {"state": state, "key": jax.random.key_data(key)})
    where = f"checkpoint in {self.store.directory}"
    for name, value in self.identity.items():
      if meta.get(name) != value:
        raise ValueError(
            f"{where} belongs to another run: {name} {meta.get(name)!r}, "
            f"expected {value!r}.")
    saved = config_lib.from_json(meta["config"])
    diff = config_lib.differences(saved, self.config)
    if diff:
      raise ValueError(
          f"{where} was made with another config: {describe(diff)}.")
    restored_key = jax.random.wrap_key_data(tree["key"])
    return steps.unalias(tree["state"]), restored_key, Record.from_json(meta)

  def close(self) -> None:
    self.store.close()
