"""Parameter importances other than the Fisher: MAS and Synaptic Intelligence.

Both return a pytree shaped like the parameters, >= 0, that feeds
:func:`ewc_jax.consolidate` in place of a Fisher.
"""

import itertools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ewc_jax._src import chunk_sums
from ewc_jax._src import chunking
from ewc_jax._src import pass_driver
from ewc_jax._src import tree as tree_lib
from ewc_jax._src import validate

MAS_CHUNK = 64


def _inputs(chunk):
  """A chunk is the inputs, or an ``(inputs, labels)`` pair."""
  if isinstance(chunk, tuple) and len(chunk) == 2:
    return chunk[0]
  return chunk


def _check_output(apply_fn, params, inputs):
  out = jax.eval_shape(apply_fn, params, inputs)
  if not hasattr(out, "shape"):
    raise ValueError(
        "mas_importance needs apply_fn(params, inputs) to return ONE array "
        f"(the model's output, e.g. its logits); got a {type(out).__name__}"
        f"{' with keys ' + str(sorted(out)) if isinstance(out, dict) else ''}"
        ": pick the output in apply_fn, e.g. lambda p, x: "
        "model(p, x)['logits'].")


def mas_importance(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    batch_size: Optional[int] = None,
) -> Any:
  r"""Memory Aware Synapses' importance (Aljundi et al. 2018).

  .. math::
    \Omega = \frac{1}{N} \sum_{n=1}^N \left| \frac{\partial
      \|f(x_n; \theta)\|_2^2}{\partial \theta} \right|

  with ``f`` the model's output (the logits: no labels needed), per example,
  averaged over the ``N`` examples. Feed it to :func:`ewc_jax.consolidate`
  as the Fisher; MAS's penalty ``lam_MAS * sum Omega (theta - theta*)^2`` has
  no 1/2, so use ``lam = 2 * lam_MAS`` in :func:`ewc_jax.ewc`.

  Example:
    >>> import jax.numpy as jnp, ewc_jax
    >>> params = {'w': jnp.array([[1.0], [2.0]])}
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> omega = ewc_jax.mas_importance(lambda p, x: x @ p['w'], params, x)
    >>> print(omega['w'][:, 0])  # |2 (x.w) x|, averaged: ([2, 0] + [0, 4]) / 2
    [1. 2.]

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` ``[batch, ...]``, in
      evaluation mode.
    params: the parameter pytree.
    data: the inputs (leading example axis), an ``(inputs, labels)`` pair
      (labels ignored, so the Fisher's data serves), or an iterable of
      either. Pytree inputs must come as ``(inputs, None)``.
    batch_size: examples per jitted chunk (padded); ``None``: 64. Memory is
      O(batch_size x #params).

  Returns:
    A float32 pytree shaped like ``params``.

  References:
    Aljundi et al., `Memory Aware Synapses: Learning what (not) to forget
    <https://arxiv.org/abs/1711.09601>`_, ECCV 2018.
  """
  size = validate.positive_int(
      "batch_size", MAS_CHUNK if batch_size is None else batch_size)
  tree_lib.check_floating("params", params)
  if not chunking.is_batch(data) and not hasattr(data, "__iter__"):
    raise ValueError(
        "data must be an array (pytree) with a leading example axis or an "
        f"iterable of such batches; got {type(data).__name__}.")
  fn = chunk_sums.MASSums(apply_fn)
  key = jax.random.key(0)  # unused: MAS draws nothing
  # Arrays go chunk by chunk too: one program over all chunks changes the
  # rounding of vmapped convolution gradients (about 1e-7) on XLA:CPU.
  batches = (_inputs(x) for x in chunking.batches(data, "data"))
  first = next(batches, None)
  if first is not None:
    _check_output(apply_fn, params, first)
  chunks = chunking.chunks(
      itertools.chain([] if first is None else [first], batches), size,
      None, "data")
  acc, count, _ = pass_driver.run_stream(fn, params, chunks, key, size)
  if count == 0:
    raise ValueError("data holds no examples: MAS needs at least one.")
  out = jax.tree.map(lambda a: a / count, acc)
  tree_lib.check_finite("the MAS importance", out)
  return out


class SIState(NamedTuple):
  """State of :func:`synaptic_intelligence`.

  Attributes:
    inner: the wrapped optimiser's state.
    omega: float32, shaped like params: the current task's path integral
      ``-sum_steps g * update``.
    start: float32, shaped like params: the parameters at the task's start.
  """
  inner: Any
  omega: Any
  start: Any


def synaptic_intelligence(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  r"""Wraps an optimiser to record Synaptic Intelligence's path integral.

  Each step the wrapper sees the gradient ``g`` it is given (the TASK
  gradient: compute it from the task loss alone, and let a penalty such as
  :func:`ewc_jax.ewc` inside ``inner`` add its pull) and the final update
  ``u`` that ``inner`` returns, and accumulates (Zenke et al. 2017)

  .. math:: \omega \leftarrow \omega - g \odot \Delta\theta, \qquad
    \Delta\theta = \mathrm{apply\_updates}(\theta, u) - \theta,

  the parameter change ``optax.apply_updates`` makes, as rounded in the
  parameters' dtype (``u`` itself in exact arithmetic; with bfloat16
  parameters an update too small to move a parameter adds nothing). At a
  task's end :func:`si_importance` turns ``omega`` into the importance and
  :func:`si_reset` starts the next task. Any optax chain gets SI by being
  wrapped::

    opt = ewc_jax.synaptic_intelligence(
        optax.chain(ewc_jax.ewc(2 * c, mode="online"), optax.adam(1e-3)))
    ...  # train task t with opt.update(task_grads, state, params)
    state = ewc_jax.consolidate(state, params,
                                ewc_jax.si_importance(state, params, xi=0.1))
    state = ewc_jax.si_reset(state, params)

  Zenke's penalty ``c * sum Omega (theta - theta*)^2`` has no 1/2, hence
  ``lam = 2c``; its reference anchors one quadratic at the latest
  parameters and sums the importances, which is ``mode="online"`` with
  ``gamma=1``.

  Example:
    >>> import jax.numpy as jnp, optax, ewc_jax
    >>> params = {'w': jnp.array([0.0, 0.0])}
    >>> opt = ewc_jax.synaptic_intelligence(optax.sgd(0.5))
    >>> state = opt.init(params)
    >>> g = {'w': jnp.array([2.0, -1.0])}
    >>> u, state = opt.update(g, state, params)
    >>> print(state.omega['w'])  # -g * (-0.5 g) = 0.5 g^2
    [2.  0.5]

  Args:
    inner: the optimiser to wrap (any ``GradientTransformation``).

  Returns:
    A ``GradientTransformation`` whose state is an :class:`SIState`.

  References:
    Zenke, Poole & Ganguli, `Continual Learning Through Synaptic
    Intelligence <https://arxiv.org/abs/1703.04200>`_, ICML 2017.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError("synaptic_intelligence wraps an optax "
                     f"GradientTransformation; got {type(inner).__name__}.")

  def init_fn(params):
    return SIState(
        inner=inner.init(params),
        omega=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
        start=jax.tree.map(
            lambda p: jnp.array(p, jnp.float32, copy=True), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "ewc_jax.synaptic_intelligence needs the current parameters: call "
          "`optimizer.update(grads, opt_state, params)`; params was None.")
    grads = updates
    updates, inner_state = inner.update(grads, state.inner, params)
    moved = optax.apply_updates(params, updates)
    omega = jax.tree.map(
        lambda w, g, new, old: w - g.astype(jnp.float32) * (
            new.astype(jnp.float32) - old.astype(jnp.float32)),
        state.omega, grads, moved, params)
    return updates, SIState(inner_state, omega, state.start)

  return optax.GradientTransformation(init_fn, update_fn)


def _find_si(opt_state, fn_name):
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SIState))
           if isinstance(s, SIState)]
  if len(found) != 1:
    raise ValueError(
        f"{fn_name} needs exactly one ewc_jax.synaptic_intelligence state in "
        f"opt_state; found {len(found)}.")
  return found[0]


def si_importance(opt_state: Any, params: Any, *, xi: float = 0.1) -> Any:
  r"""Synaptic Intelligence's importance of the task just finished.

  .. math::
    \Omega_t = \max\!\left(0, \frac{\omega}{(\theta - \theta_{start})^2
      + \xi}\right)

  with ``omega`` the path integral recorded by
  :func:`synaptic_intelligence` and ``theta - theta_start`` the task's total
  displacement. Feed it to :func:`ewc_jax.consolidate` as the Fisher.

  Zenke's reference clips the running total, ``Omega <- max(0, Omega +
  omega / (Delta^2 + xi))``; this clips each task's term, because
  :func:`ewc_jax.consolidate` folds tasks by adding non-negative
  curvatures. The two differ only where a task's path integral is negative
  (the loss went up along that coordinate) and an earlier task had credited
  it: there Zenke lowers the old importance and this keeps it.

  Args:
    opt_state: an optimiser state holding one :class:`SIState`.
    params: the parameters at the end of the task.
    xi: the damping ``xi > 0`` (Zenke et al. use 0.1 on MNIST, 1e-3 on
      CIFAR).

  Returns:
    A float32 pytree shaped like ``params``, >= 0.
  """
  validate.check_xi(xi)
  s = _find_si(opt_state, "si_importance")
  tree_lib.check_same_structure("the SI state", s.omega, "params", params)
  return jax.tree.map(
      lambda w, p, p0: jnp.maximum(w, 0.0) / (
          jnp.square(jnp.asarray(p, jnp.float32) - p0) + xi),
      s.omega, params, s.start)


def si_reset(opt_state: Any, params: Any) -> Any:
  """Starts a new task: ``omega = 0`` and ``start = params`` in the SI state.

  Args:
    opt_state: an optimiser state holding one :class:`SIState`.
    params: the parameters at the new task's start.

  Returns:
    ``opt_state`` with the SI state reset (shapes unchanged, no retrace).
  """
  s = _find_si(opt_state, "si_reset")
  tree_lib.check_same_structure("the SI state", s.start, "params", params)
  fresh = s._replace(
      omega=jax.tree.map(jnp.zeros_like, s.omega),
      start=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True),
                         params))
  return jax.tree.map(lambda x: fresh if isinstance(x, SIState) else x,
                      opt_state, is_leaf=lambda x: isinstance(x, SIState))
