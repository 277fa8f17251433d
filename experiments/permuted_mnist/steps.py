"""The jitted pieces: the training state, a chunk of steps, evaluation.

One chunk of optimiser steps is ONE ``jax.lax.scan`` over mini-batches drawn
on device from data already on device. The optimiser state keeps its shapes
across tasks and holds ``lam`` (an injected hyperparameter), so the chunk is
traced once per model, pull mode and data shape: every task, lambda and seed
reuses it. The ``*_members`` forms run K stacked runs (a vmapped sweep) as
one program: vmapping over the stacked optimiser state vmaps over ``lam``.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from experiments.permuted_mnist import models
from experiments.permuted_mnist import stream as stream_lib


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class State:
  """Everything the jitted training chunk carries.

  Attributes:
    params: the model parameters.
    opt_state: the optimiser state (holds the EWC state, and SI's path
      integral when the optimiser is wrapped by
      ``ewc_jax.synaptic_intelligence``).
  """

  params: Any
  opt_state: Any


def loss_fn(graphdef, params, x, y, class_mask, key):
  logits = models.mask_logits(
      models.apply_model(graphdef, params, x, key), class_mask)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()


def data_mesh(config: Any) -> Optional[jax.sharding.Mesh]:
  """The mesh for data-parallel training, or None for one device."""
  wanted = config.data_parallel or jax.local_device_count()
  n = max(d for d in range(1, min(wanted, jax.local_device_count()) + 1)
          if config.batch_size % d == 0)
  if n <= 1:
    return None
  return jax.make_mesh((n,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices()[:n])


def shard_batch(*arrays):
  """Shards the example axis over the ambient mesh's "data" axis, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "data" not in mesh.axis_names:
    return arrays
  spec = jax.sharding.PartitionSpec("data")
  return tuple(jax.lax.with_sharding_constraint(a, spec) for a in arrays)


def step(graphdef, tx, dropout, state: State, x, y, class_mask, key):
  """One optimiser step.

  ``tx`` gets the task loss's gradient alone: the pull is added inside it,
  and an SI wrapper around it records its path integral from that gradient.
  """
  x, y, class_mask = shard_batch(x, y, class_mask)
  key = key if dropout else None
  loss, grads = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, x, y, class_mask, key))(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return State(params=params, opt_state=opt_state), loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   donate_argnums=(5,))
def train_chunk(graphdef, tx, batch_size: int, max_steps: int, dropout: bool,
                state: State, split: stream_lib.DeviceSplit,
                num_steps: jax.Array,
                masks: jax.Array, key: jax.Array, offset: jax.Array = 0):
  """Runs ``num_steps`` optimiser steps as ONE ``jax.lax.scan``.

  Mini-batches are drawn without replacement from a permutation of the
  split's real examples (padding rows never enter a batch), made on device
  from ``key``, the key of one epoch. Step ``i`` of the chunk takes
  mini-batch ``offset + i`` of that permutation and the dropout key
  ``fold_in(., offset + i)``: an epoch split into several chunks (at a
  checkpoint, or a restart) trains exactly as one chunk would. The scan has
  the static length ``max_steps``; steps from ``num_steps`` on are skipped
  with ``jax.lax.cond``, so tasks of different sizes and a last partial
  chunk use the same compiled function.

  Args:
    graphdef: the model's graph definition (static).
    tx: the optimiser (static).
    batch_size: examples per step (static).
    max_steps: the scan length (static), at most ``split.x.shape[0] //
      batch_size``.
    dropout: whether the model uses dropout (static).
    state: the training state (donated).
    split: the training data on device.
    num_steps: steps to run, at most ``split.n // batch_size``.
    masks: ``[T, C]`` active logits per task.
    key: PRNG key of the epoch, for the permutation and dropout.
    offset: the chunk's first step's position in the epoch (0: the chunk
      starts the epoch); ``offset + num_steps <= split.n // batch_size``.

  Returns:
    ``(state, mean_loss)``: the new state and the mean training loss (task
    loss, without the pull) over the steps run.
  """
  perm_key, drop_key = jax.random.split(key)
  size = split.x.shape[0]
  scores = jax.random.uniform(perm_key, [size])
  order = jnp.argsort(jnp.where(jnp.arange(size) < split.n, scores, 2.0))

  def body(state, i):
    def run(state):
      j = offset + i  # the step's position in the epoch
      idx = jax.lax.dynamic_slice(order, [j * batch_size], [batch_size])
      return step(graphdef, tx, dropout, state, split.x[idx], split.y[idx],
                   masks[split.tid[idx]], jax.random.fold_in(drop_key, j))

    def skip(state):
      return state, jnp.zeros([], jnp.float32)

    return jax.lax.cond(i < num_steps, run, skip, state)

  state, losses = jax.lax.scan(body, state, jnp.arange(max_steps))
  return state, jnp.sum(losses) / jnp.maximum(num_steps, 1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def accuracy(graphdef, batch_size: int, params, split: stream_lib.DeviceSplit,
             class_mask: jax.Array) -> jax.Array:
  """Accuracy of the evaluation-mode model on one split (padding excluded).

  Args:
    graphdef: the model's graph definition (static).
    batch_size: evaluation batch size (static); divides the padded length.
    params: the parameters.
    split: the data, padded to a multiple of ``batch_size``.
    class_mask: ``[C]`` the task's active logits.

  Returns:
    A float32 scalar in [0, 1].
  """
  num_batches = split.x.shape[0] // batch_size
  xs = split.x.reshape(num_batches, batch_size, *split.x.shape[1:])
  ys = split.y.reshape(num_batches, batch_size)
  index = jnp.arange(split.x.shape[0]).reshape(num_batches, batch_size)

  def correct(batch):
    x, y, i = batch
    logits = models.mask_logits(models.apply_model(graphdef, params, x),
                                class_mask)
    hit = (jnp.argmax(logits, -1) == y) & (i < split.n)
    return jnp.sum(hit.astype(jnp.int32))

  return jnp.sum(jax.lax.map(correct, (xs, ys, index))) / split.n


def evaluate(graphdef, batch_size: int, params, splits, masks) -> np.ndarray:
  """Accuracy on every task's split: float64 ``[T]`` (one host transfer)."""
  accs = [accuracy(graphdef, batch_size, params, s, masks[t])
          for t, s in enumerate(splits)]
  return np.asarray(jax.device_get(accs), np.float64)


def unalias(state: State) -> State:
  """Copies every leaf, so that no two leaves share a device buffer.

  :func:`train_chunk` donates its state, and XLA refuses to donate one
  buffer twice; ``ewc_jax.ewc``'s init and online consolidation alias
  leaves.
  """
  return jax.tree.map(jnp.copy, state)


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of the same structure along a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, k: int) -> Any:
  """Member ``k`` of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def fold_in_members(keys: jax.Array, data: int) -> jax.Array:
  """``jax.random.fold_in`` of every member's key (bitwise the same)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   donate_argnums=(5,))
def train_chunks(graphdef, tx, batch_size: int, max_steps: int, dropout: bool,
                 state: State, split: stream_lib.DeviceSplit,
                 num_steps: jax.Array, masks: jax.Array, keys: jax.Array,
                 offset: jax.Array = 0):
  """:func:`experiments.train_chunk` for every member at once.

  Args:
    graphdef: the model's graph definition (static).
    tx: the optimiser (static), shared by the members.
    batch_size: examples per step (static).
    max_steps: the scan length (static).
    dropout: whether the model uses dropout (static).
    state: the members' training states, stacked (donated).
    split: the training data, shared (not batched).
    num_steps: steps to run, shared (so ``lax.cond`` stays a branch).
    masks: ``[T, C]`` active logits per task, shared.
    keys: ``[K]`` PRNG keys, one per member.
    offset: the chunk's first step's position in the epoch, shared.

  Returns:
    ``(state, mean_loss)``: the stacked new states and ``[K]`` losses.
  """
  chunk = functools.partial(train_chunk, graphdef, tx, batch_size,
                            max_steps, dropout)
  return jax.vmap(chunk, in_axes=(0, None, None, None, 0, None))(
      state, split, num_steps, masks, keys, offset)


@functools.partial(jax.jit, static_argnums=(0, 1))
def accuracies(graphdef, batch_size: int, params,
               split: stream_lib.DeviceSplit,
               class_mask: jax.Array) -> jax.Array:
  """:func:`accuracy` of every member: float32 ``[K]``.

  ``split.n`` must be ``[K]`` (the same count repeated, see
  :func:`evaluate_members`): the division ``hits / n`` is then elementwise.
  With a
  scalar ``n`` it would divide a ``[K]`` vector by a broadcast scalar, which
  XLA rewrites as a multiplication by ``1 / n``, one float32 rounding away
  from the separate runs' ``hits / n`` (0.11499999 for 23/200).
  """
  one = functools.partial(accuracy, graphdef, batch_size)
  split_axes = dataclasses.replace(split, x=None, y=None, tid=None, n=0)
  return jax.vmap(one, in_axes=(0, split_axes, None))(params, split,
                                                      class_mask)


def evaluate_members(graphdef, batch_size: int, params, splits,
                     masks) -> np.ndarray:
  """Every member's accuracy on every split: float64 ``[K, T]``."""
  num = jax.tree.leaves(params)[0].shape[0]
  accs = [accuracies(graphdef, batch_size, params,
                     dataclasses.replace(s, n=np.full([num], s.n, np.int32)),
                     masks[t])
          for t, s in enumerate(splits)]
  return np.asarray(jax.device_get(accs), np.float64).T


@jax.jit
def consolidate_members(opt_state, params, curvature):
  """``ewc_jax.consolidate`` vmapped over stacked members.

  ``consolidate`` cannot take a stacked state directly: in separate mode the
  residual ``sum A F / (A + F) (c - p)^2`` would be summed over the member
  axis too (every member would get the sum of all members' residuals; the
  pull itself, curvature and centre, is elementwise and stays right); in
  online mode ``gamma`` (``[K]`` in a stacked state) would broadcast against
  each parameter's LAST axis (an error, or silently wrong when that axis has
  length ``K``) and the residual would lose its member axis. Under
  ``jax.vmap`` each member is folded alone. Its value checks (finite,
  non-negative) need concrete values and are skipped under the trace; the
  Fisher is checked where it is computed (``ewc_jax.fisher_diagonal``).

  Args:
    opt_state: the members' optimiser states, stacked.
    params: their parameters at the end of the task, stacked.
    curvature: their Fishers (or L2 ones, SI importances), stacked.

  Returns:
    The stacked optimiser states with the task folded in.
  """
  return jax.vmap(ewc_jax.consolidate)(opt_state, params, curvature)
