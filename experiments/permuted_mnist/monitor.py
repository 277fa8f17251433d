"""Live metrics of permuted-MNIST runs: what the loop reports, where it goes.

:class:`LiveMetrics` (the ``--logdir`` / ``--wandb`` settings) opens one
:class:`Monitor` per call of :func:`loop.run`; the monitor sends each member
``(lam, seed)`` to its own trackers (:mod:`experiments.common.tracking`),
named as its checkpoint directory (``ewc-lam100.0-seed0``). Scalars:

* ``train/loss`` at every optimiser step where the loop reads a chunk's
  mean loss back (the end of each chunk; steps count over all tasks);
* ``acc/task_j`` for the task ``i`` just trained (from 0): ``R[i, j]``,
  the test accuracy matrix row by row; ``acc/average`` (tasks seen so far,
  ``mean_{j<=i} R[i, j]``), ``acc/average_all`` and ``val_acc/average``;
  against W&B's ``task`` axis at ``i``, and in TensorBoard (one step axis)
  at the optimiser step where task ``i``'s training ended;
* for methods that fold an importance in, at the same steps:
  ``pull/penalty``, the EWC penalty ``(lam/2) sum F (theta - theta*)^2`` at
  the end of task ``i``'s training, and ``pull/curvature_sum`` and
  ``pull/curvature_max`` of the curvature the pull holds once task ``i`` is
  folded in (the sum of the Fishers so far, online: their decayed sum).

Resuming. The loop flushes the trackers before each checkpoint
(:meth:`Monitor.flush`) and a resumed run's TensorBoard writer purges
everything after the checkpoint's step, so that a run killed and resumed
shows the same curves as an uninterrupted one, no point lost or repeated.

The loop's values are already on the host; the pull's sizes are a few
reductions per task, computed after the task's evaluation has synchronised,
and they read the state without changing it: a run's results are the same
with and without a monitor.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import tracking


@functools.partial(jax.jit, static_argnums=(1,))
def _penalty(state, batched: bool) -> jax.Array:
  one = lambda s: ewc_jax.penalty(s.params, s.opt_state)  # noqa: E731
  return jax.vmap(one)(state) if batched else one(state)


@functools.partial(jax.jit, static_argnums=(1,))
def _curvature(opt_state, batched: bool) -> tuple[jax.Array, jax.Array]:
  def one(s):
    leaves = jax.tree.leaves(optax.tree_utils.tree_get(s, "curvature"))
    return (sum(jnp.sum(x) for x in leaves),
            functools.reduce(jnp.maximum, [jnp.max(x) for x in leaves]))
  return jax.vmap(one)(opt_state) if batched else one(opt_state)


def holds_ewc_state(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds an :func:`ewc_jax.ewc` state (a method
  with another pull, e.g. Kronecker-factored, reports no pull sizes)."""
  return any(isinstance(x, ewc_jax.EWCState) for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ewc_jax.EWCState)))


class Monitor:
  """Sends the loop's numbers of K members to K trackers."""

  def __init__(self, open_trackers: Callable[[Optional[int]], list[Any]],
               *, batched: bool, reports_pull: bool):
    """Args:
      open_trackers: ``purge_step -> `` one tracker per member, in the
        loop's order.
      batched: the loop's states are stacked over members.
      reports_pull: the method folds an importance into the pull.
    """
    self._open, self.trackers = open_trackers, []
    self.batched, self.reports_pull = batched, reports_pull

  def start(self, step: int) -> None:
    """Opens the trackers; the run starts (or resumes) at ``step``.

    A resumed run's trackers drop what an interrupted attempt logged after
    ``step`` (TensorBoard's purge step), so no stretch shows twice; the
    loss at ``step`` itself was read before the checkpoint and stays.
    """
    self.close()
    self.trackers = self._open(step + 1 if step > 0 else None)

  def loss(self, step: int, losses: np.ndarray) -> None:
    """Each member's mean loss of the chunk ending at ``step``."""
    for tracker, value in zip(self.trackers, np.reshape(losses, -1),
                              strict=True):
      tracker.scalars({"train/loss": value}, step)

  def flush(self) -> None:
    """Puts everything logged so far on disk (before a checkpoint)."""
    for tracker in self.trackers:
      tracker.flush()

  def task_end(self, task: int, acc: np.ndarray, val_acc: np.ndarray,
               before: Any, after: Optional[Any], step: int) -> None:
    """The accuracies ``[K, T]`` after ``task`` and the pull's sizes.

    Args:
      task: the task just trained (0 for joint training's one phase).
      step: the optimiser step (over all tasks) where it ended.
      acc: test accuracy of every task, per member.
      val_acc: the same on the validation splits.
      before: the training state at the end of the task's training.
      after: the state with the task folded in (``None``: nothing folded).
    """
    pull = {}
    if self.reports_pull and holds_ewc_state(before.opt_state):
      pull["pull/penalty"] = np.reshape(
          jax.device_get(_penalty(before, self.batched)), -1)
      if after is not None:
        total, most = jax.device_get(_curvature(after.opt_state,
                                                self.batched))
        pull["pull/curvature_sum"] = np.reshape(total, -1)
        pull["pull/curvature_max"] = np.reshape(most, -1)
    for k, tracker in enumerate(self.trackers):
      row = np.asarray(acc[k], np.float64)
      values = {f"acc/task_{j}": v for j, v in enumerate(row)}
      values["acc/average"] = row[:task + 1].mean()
      values["acc/average_all"] = row.mean()
      values["val_acc/average"] = np.mean(val_acc[k][:task + 1])
      values.update({name: v[k] for name, v in pull.items()})
      tracker.scalars(values, task, axis="task", global_step=step)

  def close(self) -> None:
    for tracker in self.trackers:
      tracker.close()
    self.trackers = []


@dataclasses.dataclass(frozen=True)
class LiveMetrics:
  """Where live metrics go.

  Attributes:
    logdir: TensorBoard event files, one subdirectory per run.
    wandb_project: a W&B project (needs ``wandb``), or ``None``.
    group: the W&B group (the experiment's run directory).
  """

  logdir: Optional[str] = None
  wandb_project: Optional[str] = None
  group: Optional[str] = None

  def open(self, config: Any, method: Any,
           points: Sequence[tuple[float, int]], *,
           batched: bool = False) -> Monitor:
    """The monitor of one :func:`loop.run` call (its trackers open when
    the loop starts, :meth:`Monitor.start`; the caller closes it).

    Args:
      config: the experiment's config (W&B's run config).
      method: the :class:`methods.Method`.
      points: the members' ``(lam, seed)``.
      batched: the members train as one vmapped program.
    """
    def open_trackers(purge_step):
      return [tracking.open_trackers(
          checkpoint_lib.run_name(method.name, lam, seed),
          logdir=self.logdir, wandb_project=self.wandb_project,
          group=self.group, config={**config.to_json(), "method": method.name,
                                    "lam": lam, "seed": seed},
          purge_step=purge_step) for lam, seed in points]

    return Monitor(open_trackers, batched=batched,
                   reports_pull=method.importance is not None
                   and not method.joint)
