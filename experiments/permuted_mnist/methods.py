"""The methods, as a registry: what each one folds in after a task.

Every method trains the same model with the same optimiser,
``optax.chain(ewc_jax.ewc(lam, mode=..., gamma=...), base_optimizer)``; a
:class:`Method` declares how it wires that pull (mode, the config field of
its strength, the strength's scale, whether ``gamma`` applies) and its
importance function: what :func:`ewc_jax.consolidate` folds in at each task
boundary. Adding a method is adding one entry to :data:`REGISTRY`; a
method whose pull is not :func:`ewc_jax.ewc` (KFAC-EWC) also names its
optimiser factory and its consolidation.

* ``finetune``: nothing (``lam = 0``): the forgetting baseline.
* ``l2``: a "Fisher" of ones, i.e. plain L2 towards the past solutions.
* ``ewc``: the diagonal Fisher of the finished task (Kirkpatrick et al. 2017),
  one quadratic per task (``mode="separate"``).
* ``online_ewc``: ``F* <- gamma F* + F`` anchored at the latest parameters
  (Schwarz et al. 2018).
* ``si``: Synaptic Intelligence (Zenke et al. 2017): the EWC chain wrapped
  by :func:`ewc_jax.synaptic_intelligence`, which records the path integral
  ``omega = sum_steps -g * delta_theta`` (``g`` the gradient of the task
  loss alone, ``delta_theta`` the step's parameter change); after each
  task :func:`ewc_jax.si_importance`, ``Omega = max(omega, 0) / (Delta^2 +
  xi)``, is folded in online with ``gamma = 1`` and
  :func:`ewc_jax.si_reset` starts the next path integral.
  Zenke's surrogate loss ``c sum Omega (theta - theta*)^2`` has no 1/2, so
  the pull uses ``lam = 2 c``. Negative path integrals are clipped at 0: a
  negative curvature would push parameters away.
* ``mas``: Memory Aware Synapses (Aljundi et al. 2018): the importance
  ``mean_x |d ||f(x)||^2 / d theta|`` (:func:`ewc_jax.mas_importance`) on
  the task's training inputs, one quadratic per task. MAS's penalty
  ``lam_MAS sum Omega (theta - theta*)^2`` has no 1/2, so the pull uses
  ``lam = 2 mas_lam``; ``mas_lam`` is stored as MAS's lambda.
* ``kfac_ewc``: EWC with a Kronecker-factored Fisher per dense layer
  (Ritter, Botev & Barber 2018): the pull is :func:`ewc_jax.kfac_ewc` built
  on the model's layers (:func:`ewc_jax.dense_layers`), each task's
  :func:`ewc_jax.kfac_fisher` folded in with :func:`ewc_jax.kfac_consolidate`
  in separate mode: one exact Kronecker term per task, each with its own
  anchor (``max_tasks = num_tasks``; memory and step time linear in the
  tasks). Same ``lam`` convention as ``ewc``.
* ``online_kfac_ewc``: online mode with pooled factors (O(1) memory): old
  factors decayed by ``gamma`` and summed, anchored at the latest task.
* ``online_kfac_ewc_sum``: online mode with one exact Kronecker term per
  task, weighted ``gamma ** age`` (Ritter et al.'s online Laplace with the
  sum kept exactly; ``max_tasks = num_tasks``).
* ``joint``: one model trained on the union of all tasks: the upper bound.
"""

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

import ewc_jax
from experiments.permuted_mnist import models
from experiments.permuted_mnist import stream as stream_lib

# importance(config, graphdef, state, task, key) -> a tree like the params.
Importance = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Method:
  """One continual-learning method.

  Attributes:
    name: the name used on the command line and in the results.
    lam_field: the config field holding its strength sweep (``None``: no
      pull, ``lam = 0``).
    mode: the pull's mode, ``"separate"`` or ``"online"``.
    lam_scale: the pull's ``lam`` is ``lam_scale`` times the swept value
      (SI: 2, Zenke's ``c`` has no 1/2).
    uses_gamma: the pull decays the old curvature by ``config.gamma``.
    importance: ``(config, graphdef, state, task, key) -> curvature`` of one
      run, folded in after every task but the last (``None``: nothing).
    member_importance: the same for stacked members (``keys`` ``[K]``);
      ``None``: one :attr:`importance` call per member.
    joint: trains once on the union of all tasks.
    optimizer: ``(config, graphdef, params, method) -> tx``, the method's
      own optimiser factory (``None``: :func:`make_optimizer`'s EWC chain).
      It must return the same object for the same model (cache it): the
      jitted training chunk takes ``tx`` as a static argument.
    per_task: KFAC-EWC keeps one Kronecker term per task (``max_tasks =
      num_tasks``) instead of pooled factors.
    consolidate: ``(opt_state, params, curvature) -> opt_state``, folds a
      finished task into the pull's state and readies the next task
      (vmapped for stacked members).
  """

  name: str
  lam_field: Optional[str] = None
  mode: str = "separate"
  lam_scale: float = 1.0
  uses_gamma: bool = False
  importance: Optional[Importance] = None
  member_importance: Optional[Importance] = None
  joint: bool = False
  optimizer: Optional[Callable[..., optax.GradientTransformation]] = None
  consolidate: Callable[..., Any] = ewc_jax.consolidate
  per_task: bool = False

  def pull(self, lam: float, config: Any) -> tuple[float, float]:
    """The pull's ``(lam, gamma)`` for the swept value ``lam``."""
    pull_lam = 0.0 if self.lam_field is None else self.lam_scale * float(lam)
    return pull_lam, float(config.gamma) if self.uses_gamma else 1.0


# ----------------------------------------------------------------------------
# Optimiser wiring: lambda and gamma live in ONE place, the optimiser state.


@functools.lru_cache(maxsize=None)
def make_optimizer(base: tuple[Any, ...],
                   mode: str) -> optax.GradientTransformation:
  """``optax.chain(ewc_jax.ewc(lam, mode=mode), base optimiser)``.

  ``lam`` is an injected hyperparameter and ``gamma`` a field of the EWC
  state: both live in the optimiser state (:func:`set_pull`), not in the
  transformation. One object
  per ``(base, mode)`` (cached), so every lambda of a sweep, every seed and
  the unregularised methods share one compiled training chunk.

  Args:
    base: ``("adam", lr, b1, b2)`` or ``("sgd", lr, momentum)``.
    mode: ``"separate"`` or ``"online"``.
  """
  pull = optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))
  return optax.chain(pull(lam=0.0, mode=mode), base_transform(base))


def base_transform(base: tuple[Any, ...]) -> optax.GradientTransformation:
  """The base optimiser described by ``base`` (:func:`base_optimizer`)."""
  if base[0] == "adam":
    _, lr, b1, b2 = base
    return optax.adam(lr, b1=b1, b2=b2)
  if base[0] == "sgd":
    _, lr, momentum = base
    return optax.sgd(lr, momentum=momentum or None)
  raise ValueError(f"unknown optimizer {base[0]!r}.")


@functools.lru_cache(maxsize=None)
def make_kfac_optimizer(base: tuple[Any, ...], mode: str, layers: tuple,
                        max_tasks: Optional[int] = None
                        ) -> optax.GradientTransformation:
  """``optax.chain(ewc_jax.kfac_ewc(lam, layers, mode=mode,
  max_tasks=max_tasks), base)``.

  As :func:`make_optimizer`: ``lam`` is an injected hyperparameter and
  ``gamma`` a field of the KFAC-EWC state (``kfac_gamma``), both set in the
  state by :func:`set_pull`. Cached per ``(base, mode, layers,
  max_tasks)``: one object, one compiled chunk, per model.
  """
  pull = optax.inject_hyperparams(ewc_jax.kfac_ewc,
                                  static_args=("gamma", "max_tasks"))
  return optax.chain(pull(lam=0.0, layers=layers, mode=mode,
                          max_tasks=max_tasks), base_transform(base))


def input_shape(config: Any) -> tuple[int, ...]:
  """The shape of one input image (after ``pad_to``, if the config has it)."""
  side = getattr(config, "pad_to", None) or 28
  return (side, side)


@functools.lru_cache(maxsize=None)
def make_si_optimizer(base: tuple[Any, ...],
                      mode: str) -> optax.GradientTransformation:
  """:func:`make_optimizer`'s chain wrapped by
  :func:`ewc_jax.synaptic_intelligence` (cached per ``(base, mode)``)."""
  return ewc_jax.synaptic_intelligence(make_optimizer(base, mode))


def si_optimizer(config, graphdef, params, method):
  """SI's optimiser: the EWC chain, recording the path integral."""
  del graphdef, params
  return make_si_optimizer(base_optimizer(config), method.mode)


def kfac_max_tasks(method: "Method", config: Any) -> Optional[int]:
  """The ``max_tasks`` of ``method``'s KFAC-EWC store (``None``: pooled).

  The runner folds in every task but the last, so ``num_tasks`` slots
  always suffice.
  """
  return config.num_tasks if method.per_task else None


def kfac_optimizer(config, graphdef, params, method):
  """KFAC-EWC's optimiser, on the dense layers of ``graphdef``'s model."""
  layers = ewc_jax.dense_layers(
      models.eval_apply_fn(graphdef), params,
      jnp.zeros((1, *input_shape(config)), jnp.float32))
  return make_kfac_optimizer(base_optimizer(config), method.mode, layers,
                             kfac_max_tasks(method, config))


def optimizer(method: "Method", config: Any, graphdef,
              params) -> optax.GradientTransformation:
  """``method``'s optimiser for the model ``(graphdef, params)``."""
  if method.optimizer is not None:
    return method.optimizer(config, graphdef, params, method)
  return make_optimizer(base_optimizer(config), method.mode)


def set_pull(opt_state: Any, lam: float, gamma: float) -> Any:
  """The optimiser state with the pull's ``lam`` and ``gamma`` set.

  :func:`ewc_jax.set_hyperparams` knows where each lives (``lam`` where
  ``inject_hyperparams`` keeps it, ``gamma`` in the EWC or KFAC-EWC state);
  float32 values, so the jitted step is not retraced.
  """
  return ewc_jax.set_hyperparams(opt_state, lam=jnp.float32(lam),
                                 gamma=jnp.float32(gamma))


def base_optimizer(config: Any) -> tuple[Any, ...]:
  """The hashable description of ``config``'s base optimiser."""
  if config.optimizer == "adam":
    return ("adam", config.learning_rate, config.b1, config.b2)
  return ("sgd", config.learning_rate, config.momentum)


# ----------------------------------------------------------------------------
# Importance functions.


def ones_importance(config, graphdef, state, task, key):
  """L2: a curvature of ones (stacked states work as they are)."""
  del config, graphdef, task, key
  return jax.tree.map(jnp.ones_like, state.params)


def si_state_importance(config, graphdef, state, task, key):
  """SI's importance (:func:`ewc_jax.si_importance`) from the training
  state (elementwise: stacks work)."""
  del graphdef, task, key
  return ewc_jax.si_importance(state.opt_state, state.params,
                               xi=config.si_xi)


def si_consolidate(opt_state, params, curvature):
  """Folds SI's importance in and starts the next task's path integral."""
  return ewc_jax.si_reset(ewc_jax.consolidate(opt_state, params, curvature),
                          params)


def fisher_fn(config, graphdef, task, data) -> Callable[[Any, Any], Any]:
  """``(params, key) -> `` the diagonal Fisher of ``task`` on ``data``."""
  apply_fn = models.eval_apply_fn(graphdef, tuple(task.classes),
                                  task.num_classes)

  def fisher(params, key):
    return ewc_jax.fisher_diagonal(
        apply_fn, params, data, estimator=config.fisher, rng=key,
        batch_size=config.fisher_batch_size)

  return fisher


def fisher_importance(config, graphdef, state, task, key):
  """The diagonal Fisher on (a ``fisher_examples`` subset of) the task."""
  seed = int(jax.random.randint(key, [], 0, 2**31 - 1))
  data = stream_lib.subset(task.train_x, task.train_y,
                           config.fisher_examples, seed)
  return fisher_fn(config, graphdef, task, data)(state.params, key)


def task_data(config, task, key):
  """The task's training data, a ``fisher_examples`` subset if set."""
  seed = int(jax.random.randint(key, [], 0, 2**31 - 1))
  return stream_lib.subset(task.train_x, task.train_y,
                           config.fisher_examples, seed)


def task_apply_fn(graphdef, task):
  """The evaluation-mode model with ``task``'s head (cached)."""
  return models.eval_apply_fn(graphdef, tuple(task.classes), task.num_classes)


def mas_importance(config, graphdef, state, task, key):
  """MAS's importance on (a ``fisher_examples`` subset of) the task."""
  return ewc_jax.mas_importance(
      task_apply_fn(graphdef, task), state.params,
      task_data(config, task, key), batch_size=config.fisher_batch_size)


def kfac_importance(config, graphdef, state, task, key):
  """The Kronecker-factored Fisher (:func:`ewc_jax.kfac_fisher`)."""
  return ewc_jax.kfac_fisher(
      task_apply_fn(graphdef, task), state.params,
      task_data(config, task, key),
      estimator=config.kfac_fisher or config.fisher, rng=key,
      batch_size=config.fisher_batch_size)


def shares_fisher_data(config: Any, task: Any) -> bool:
  """Whether every member's Fisher reads the same examples of ``task``
  (no ``fisher_examples`` budget smaller than the task)."""
  limit = config.fisher_examples
  return limit is None or len(task.train_y) <= limit


def fisher_member_importance(config, graphdef, state, task, keys):
  """Every member's Fisher: one vmapped pass over shared data, else
  :func:`fisher_importance` per member (each draws its own subset)."""
  if not shares_fisher_data(config, task):
    return per_member(fisher_importance)(config, graphdef, state, task, keys)
  fisher = fisher_fn(config, graphdef, task, (task.train_x, task.train_y))
  with warnings.catch_warnings():
    # The first chunk's accumulator is unbatched (zeros), the result
    # batched: its donation cannot be used, which is harmless.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return jax.vmap(fisher)(state.params, keys)


def per_member(importance: Importance) -> Importance:
  """Applies a one-run ``importance`` to each stacked member in turn."""

  def members(config, graphdef, state, task, keys):
    one = lambda k: jax.tree.map(lambda x: x[k], state)  # noqa: E731
    parts = [importance(config, graphdef, one(k), task, keys[k])
             for k in range(len(keys))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)

  return members


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("finetune"),
    Method("l2", lam_field="l2_lam", importance=ones_importance,
           member_importance=ones_importance),
    Method("ewc", lam_field="lam", importance=fisher_importance,
           member_importance=fisher_member_importance),
    Method("online_ewc", lam_field="online_lam", mode="online",
           uses_gamma=True, importance=fisher_importance,
           member_importance=fisher_member_importance),
    Method("mas", lam_field="mas_lam", lam_scale=2.0,
           importance=mas_importance),
    Method("kfac_ewc", lam_field="kfac_lam", importance=kfac_importance,
           optimizer=kfac_optimizer, consolidate=ewc_jax.kfac_consolidate,
           per_task=True),
    Method("online_kfac_ewc", lam_field="online_kfac_lam", mode="online",
           uses_gamma=True, importance=kfac_importance,
           optimizer=kfac_optimizer, consolidate=ewc_jax.kfac_consolidate),
    Method("online_kfac_ewc_sum", lam_field="online_kfac_sum_lam",
           mode="online", uses_gamma=True, importance=kfac_importance,
           optimizer=kfac_optimizer, consolidate=ewc_jax.kfac_consolidate,
           per_task=True),
    Method("si", lam_field="si_c", mode="online", lam_scale=2.0,
           importance=si_state_importance,
           member_importance=si_state_importance, optimizer=si_optimizer,
           consolidate=si_consolidate),
    Method("joint", joint=True),
)}


def get(name: str) -> Method:
  """The registered method ``name``.

  Raises:
    ValueError: an unknown name (the valid ones are listed).
  """
  if name not in REGISTRY:
    raise ValueError(
        f"unknown method {name!r}; valid: {tuple(REGISTRY)}.")
  return REGISTRY[name]
