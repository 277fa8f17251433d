"""A run's checkpoints: where it stands (:class:`Record`) and its arrays.

The saved tree is ``{"state": State, "key": key_data}`` (stacked over the
members of a vmapped group); ``meta`` holds the :class:`Record`, the run's
identity (method, members, data seed) and the resolved config, which a
restore checks. Files: :mod:`experiments.common.checkpoint` (orbax).

The two latest checkpoints are kept. A restore falls back from a damaged
one (unreadable files, or arrays holding nan or inf, which training never
checkpoints) to the one before, and deletes the damaged one.
"""

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from experiments.common import checkpoint as checkpoint_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import steps


logger = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
  """The training loss (or a state to checkpoint) became nan or inf, or
  blew up."""


class CheckpointError(ValueError):
  """A checkpoint of another run or config, or none left undamaged (one
  line, saying how to restart the run)."""


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
    self.store = checkpoint_lib.RunCheckpoints(directory, max_to_keep=2)
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
    """The latest good checkpoint, or ``None`` when there is none.

    A damaged checkpoint is logged, deleted, and the one before it read.

    Raises:
      CheckpointError: a checkpoint of another run or config; or every
        checkpoint is damaged (the message says how to restart the run).
    """
    like = {"state": state, "key": jax.random.key_data(key)}
    damage = []
    for step in self.store.all_steps():
      try:
        tree, meta = self.store.restore(like, step=step)
        self._check(meta, step)
        _check_finite(tree, f"checkpoint {self.store.directory}/{step}")
      except checkpoint_lib.CheckpointDamaged as e:
        damage.append(str(e))
        logger.warning("%s; falling back to the checkpoint before it.", e)
        self.store.delete(step)
        continue
      except CheckpointError:
        raise
      except ValueError as e:  # another model or format: not damage
        raise CheckpointError(
            f"{e} Delete {self.store.directory} to train this run from its "
            "start.") from None
      restored_key = jax.random.wrap_key_data(tree["key"])
      return (steps.unalias(tree["state"]), restored_key,
              Record.from_json(meta))
    if damage:
      raise CheckpointError(
          f"{damage[-1]}; no undamaged checkpoint of this run is left. To "
          f"train this run again from its start, delete "
          f"{self.store.directory} and resume (finished runs are kept).")
    return None

  def _check(self, meta: dict[str, Any], step: int) -> None:
    """Refuses a checkpoint of another run or config (not damage)."""
    where = f"checkpoint {self.store.directory}/{step}"
    how = (f"; delete {self.store.directory} to train this run from its "
           "start, or resume with the run's own config.")
    for name, value in self.identity.items():
      if meta.get(name) != value:
        raise CheckpointError(
            f"{where} belongs to another run: {name} {meta.get(name)!r}, "
            f"expected {value!r}{how}")
    try:
      saved = config_lib.from_json(meta["config"])
      Record.from_json(meta)  # every field of the record is readable
    except (KeyError, TypeError, ValueError) as e:
      raise checkpoint_lib.CheckpointDamaged(
          f"{where}: its metadata is damaged ({e!r})") from None
    diff = config_lib.differences(saved, self.config)
    if diff:
      raise CheckpointError(
          f"{where} was made with another config: {describe(diff)}{how}")

  def close(self) -> None:
    self.store.close()


def _check_finite(tree: Any, where: str) -> None:
  """A restored state holding nan or inf is damage: none is ever saved."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      raise checkpoint_lib.CheckpointDamaged(
          f"{where} is corrupt: {jax.tree_util.keystr(path)} holds nan or "
          "inf, which training never checkpoints")
