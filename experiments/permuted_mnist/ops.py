"""What the loop does to one run's state, or to K stacked members' states.

:class:`Ops` picks the single or the vmapped form of each device operation
(:mod:`steps`); :func:`init_state` and :func:`consolidate` build and update
the training state the way every method declares it (:mod:`methods`).
"""

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

import ewc_jax
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import models
from experiments.permuted_mnist import steps


def init_state(config: config_lib.Config, method: methods_lib.Method,
               num_classes: int, points: Sequence[tuple[float, int]],
               batched: bool):
  """``(graphdef, tx, state)``: the members' initial states (stacked when
  ``batched``), each initialised from its seed with its pull set."""
  graphdef, tx, states = None, None, []
  for lam, seed in points:
    model = models.make_model(
        config.model, num_classes, seed=seed, hidden=config.hidden,
        dropout=config.dropout, channels=config.channels,
        cnn_hidden=config.cnn_hidden,
        in_features=math.prod(methods_lib.input_shape(config)))
    graphdef, params = models.split_model(model)
    if tx is None:  # the method's optimiser may depend on the model
      tx = methods_lib.optimizer(method, config, graphdef, params)
    state = steps.State(params=params, opt_state=methods_lib.set_pull(
        tx.init(params), *method.pull(lam, config)))
    states.append(state)
  state = steps.stack(states) if batched else states[0]
  return graphdef, tx, steps.unalias(state)


@functools.lru_cache(maxsize=None)
def vmapped(consolidate):
  """``consolidate`` jitted and vmapped over stacked members (cached).

  Each member is folded alone, as :func:`steps.consolidate_members` explains
  for ``ewc_jax.consolidate``; value checks are skipped under the trace.
  """
  return jax.jit(jax.vmap(consolidate))


class Ops:
  """The loop's device operations for one run or for stacked members."""

  def __init__(self, batched: bool, method: methods_lib.Method):
    self.batched = batched
    if batched:
      self.train_chunk = steps.train_chunks
      self.fold_in = steps.fold_in_members
      self.consolidate = (
          steps.consolidate_members
          if method.consolidate is ewc_jax.consolidate
          else vmapped(method.consolidate))
      self.importance = (method.member_importance
                         or methods_lib.per_member(method.importance))
    else:
      self.train_chunk = steps.train_chunk
      self.fold_in = jax.random.fold_in
      self.consolidate = method.consolidate
      self.importance = method.importance

  def keys(self, points):
    if self.batched:
      return jnp.stack([jax.random.key(seed) for _, seed in points])
    return jax.random.key(points[0][1])

  def evaluate(self, graphdef, batch_size, params, splits, masks):
    """Accuracies ``[K, T]`` (``K = 1`` for one run)."""
    if self.batched:
      return steps.evaluate_members(graphdef, batch_size, params, splits,
                                    masks)
    return steps.evaluate(graphdef, batch_size, params, splits, masks)[None]


def consolidate(method: methods_lib.Method, config: config_lib.Config,
                graphdef, state: steps.State, task, key, *,
                batched: bool = False) -> steps.State:
  """Folds the finished ``task`` into the EWC state with ``method``'s
  importance (SI: and starts the next path integral).

  Args:
    method: the method (its importance must not be ``None``).
    config: the experiment configuration.
    graphdef: the model's graph definition.
    state: the training state at the end of the task (stacked if
      ``batched``).
    task: the finished task (its training data feeds the Fisher).
    key: the Fisher's PRNG key (``[K]`` keys if ``batched``).
    batched: ``state`` holds stacked members.

  Returns:
    The new state, with no two leaves sharing a buffer.
  """
  ops = Ops(batched, method)
  curvature = ops.importance(config, graphdef, state, task, key)
  state = dataclasses.replace(state, opt_state=ops.consolidate(
      state.opt_state, state.params, curvature))
  return steps.unalias(state)
