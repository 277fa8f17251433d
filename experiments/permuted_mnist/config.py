"""The experiment's configuration: a frozen dataclass, its checks, presets.

``get_config(preset)`` returns a :class:`Config` from ``configs/<preset>.py``;
the command line (``main.py``, built with tyro from this dataclass) sets any
field, e.g. ``--epochs 3`` or ``--hidden 400 400``. Importing this module
imports neither tensorflow_datasets nor matplotlib.

Lambda conventions. Our EWC penalty is ``(lam/2) sum_i F_i (theta_i -
theta*_i)^2`` with ``F`` the per-example Fisher averaged over examples
(Kirkpatrick et al. 2017); van de Ven's code writes the same formula, so his
lambdas carry over, except for online EWC: his loss multiplies the stored
running Fisher by ``gamma`` once more (``gamma * (F_new + gamma * F_old)``),
so his ``lambda`` equals our ``lam / gamma``. SI's surrogate loss is
``c sum_i Omega_i (theta_i - theta*_i)^2`` with no 1/2 (Zenke et al. 2017),
so the quadratic pull uses ``lam = 2 c``; ``si_c`` is stored as ``c``.
"""

import dataclasses
import importlib
import math
import numbers
import pkgutil
import typing
from typing import Any, Literal, Optional

import ewc_jax
from experiments import data
from experiments.permuted_mnist import configs
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import models
from experiments.permuted_mnist import tasks

METHODS = tuple(methods_lib.REGISTRY)
OPTIMIZERS = ("adam", "sgd")
# jax.default_matmul_precision values; "default" leaves JAX's own choice.
MATMUL_PRECISIONS = ("default", "high", "highest")
# The field holding each regularised method's strength sweep.
LAM_FIELDS = {m.name: m.lam_field for m in methods_lib.REGISTRY.values()
              if m.lam_field is not None}
# The per-example estimators: KFAC-EWC's choices.
KFAC_ESTIMATORS = tuple(e for e in ewc_jax.ESTIMATORS if e != "batched")
# The fields with a fixed set of values, as Literal types: tyro lists the
# choices in --help and refuses others; validate() checks them too.
Dataset = Literal[data.DATASET_NAMES]
TaskKind = Literal[tasks.TASK_KINDS]
ModelName = Literal[models.MODELS]
OptimizerName = Literal[OPTIMIZERS]
MethodName = Literal[METHODS]
Estimator = Literal[ewc_jax.ESTIMATORS]
KfacEstimator = Literal[KFAC_ESTIMATORS]
MatmulPrecision = Literal[MATMUL_PRECISIONS]
# Fields that change how a run is shown or kept, never its results: a run
# may be resumed with other values.
RESULT_NEUTRAL = ("progress", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Tuples are sweeps or lists.

  Attributes:
    preset: the name of the preset this came from.
    dataset: a name from ``experiments.data.DATASET_NAMES``.
    data_dir: the IDX or TFDS directory (see ``experiments.data``).
    tasks: ``permuted``, ``rotated``, ``split_task`` or ``split_domain``.
    num_tasks: length of the task sequence. The split kinds have 5 tasks
      (pairs of digits): on the command line ``--tasks split_task`` (or
      ``split_domain``) sets 5 unless ``--num-tasks`` is given.
    val_fraction: share of each task's training data held out for
      validation (model selection; the test split is only reported).
    pad_to: zero-pad the images to ``pad_to x pad_to`` before permuting
      (van de Ven & Tolias: 32, 1024 inputs); ``None``: 28x28, no padding.
      Permuted tasks and the MLP only.
    train_examples: use a random subset of at most this many training
      examples per task (``None``: all).
    model: ``mlp`` or ``cnn``.
    hidden: the MLP's hidden widths.
    channels: the CNN's convolution channels.
    cnn_hidden: the CNN's dense width.
    dropout: dropout rate during training (off for evaluation and Fisher).
    optimizer: ``adam`` or ``sgd`` (the base optimiser after the EWC pull).
    learning_rate: its learning rate.
    b1: Adam's beta1.
    b2: Adam's beta2.
    momentum: SGD momentum (0 for plain SGD).
    batch_size: training mini-batch size.
    epochs: passes over each task's training data.
    iterations: mini-batch steps per task; overrides ``epochs`` when set.
    methods: which methods to run (from ``METHODS``), on the same data.
    lam: EWC's lambda sweep. On the command line ``--lam LIST`` sets the
      sweep of every regularised method of the run and ``--lam
      METHOD=LIST`` one method's (``--set lam=LIST``: EWC's alone).
    online_lam: online EWC's lambda sweep.
    gamma: online EWC's decay of the old Fisher.
    l2_lam: the L2 (Fisher = 1) strength sweep.
    si_c: SI's c sweep (Zenke's convention: the pull uses ``lam = 2c``).
    mas_lam: MAS's lambda sweep (Aljundi's convention, no 1/2: the pull
      uses ``lam = 2 mas_lam``).
    kfac_lam: KFAC-EWC's lambda sweep (same convention as ``lam``).
    online_kfac_lam: online KFAC-EWC's lambda sweep (decay ``gamma``).
    online_kfac_sum_lam: the same for ``online_kfac_ewc_sum`` (one exact
      Kronecker term per task instead of pooled factors).
    si_xi: SI's damping xi in ``Omega = omega / (Delta^2 + xi)``.
    fisher: the Fisher estimator: ``exact`` (all classes weighted by p(y|x),
      the default), ``sampled`` (labels drawn from the model),
      ``empirical`` (the data labels), ``predicted`` (the model's argmax
      label, van de Ven & Tolias 2019) or ``batched`` (squared mini-batch
      mean gradients, ~F / batch size; for comparison).
    kfac_fisher: KFAC-EWC's estimator (``exact``, ``sampled``,
      ``empirical``, ``predicted``); ``None``: the same as ``fisher``.
    fisher_examples: the Fisher uses a random subset of this many of the
      task's training examples (``None``: all of them).
    fisher_batch_size: chunk size of the Fisher pass.
    seeds: one run per seed (model init, data order, task stream).
    eval_batch_size: batch size of the jitted evaluation.
    checkpoint_every: within a task, also checkpoint every this many
      optimiser steps (``None``, the default: only after each task, which
      bounds the work lost to a crash by one task; each checkpoint copies
      the whole state to the host). Chunk boundaries never change the
      results: each step's mini-batch and dropout key depend only on (seed,
      task, step).
    data_parallel: devices for data-parallel training: each mini-batch is
      sharded over a mesh axis ``"data"`` of this many local devices (0: all
      local devices; 1: off). The largest count that divides ``batch_size``
      is used. Results equal one device's up to float32 reduction order.
    keep_checkpoints: keep each finished run's last checkpoint (final
      parameters and optimiser state); by default it is deleted once the
      run's results are in ``runs.json``.
    progress: show tqdm progress bars.
    matmul_precision: ``default`` (the platform's choice: on GPUs float32
      matmuls may run as TF32, and a vmapped sweep's batched matmuls may
      pick other algorithms than a single run's, so members differ from
      their separate runs; docs/scaling.md), ``high`` or ``highest`` (full
      float32: members agree with separate runs to float32 rounding);
      applied with ``jax.default_matmul_precision`` around the run. On a
      CPU every value gives the same results.
  """

  preset: str = "quick"
  dataset: Dataset = "auto"
  data_dir: Optional[str] = None
  tasks: TaskKind = "permuted"
  num_tasks: int = 10
  val_fraction: float = 0.1
  pad_to: Optional[int] = None
  train_examples: Optional[int] = None
  model: ModelName = "mlp"
  hidden: tuple[int, ...] = (256, 256)
  channels: tuple[int, ...] = (16, 32)
  cnn_hidden: int = 128
  dropout: float = 0.0
  optimizer: OptimizerName = "adam"
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  momentum: float = 0.0
  batch_size: int = 64
  epochs: int = 5
  iterations: Optional[int] = None
  methods: tuple[MethodName, ...] = ("finetune", "l2", "ewc", "online_ewc",
                                     "si", "joint")
  lam: tuple[float, ...] = (30.0, 100.0)
  online_lam: tuple[float, ...] = (30.0, 100.0)
  gamma: float = 0.9
  l2_lam: tuple[float, ...] = (1e-4, 1e-3)
  si_c: tuple[float, ...] = (3.0, 10.0)
  si_xi: float = 0.1
  mas_lam: tuple[float, ...] = (1.0, 10.0)
  kfac_lam: tuple[float, ...] = (30.0, 100.0)
  online_kfac_lam: tuple[float, ...] = (30.0, 100.0)
  online_kfac_sum_lam: tuple[float, ...] = (30.0, 100.0)
  fisher: Estimator = "exact"
  kfac_fisher: Optional[KfacEstimator] = None
  fisher_examples: Optional[int] = None
  fisher_batch_size: int = 256
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_batch_size: int = 1000
  checkpoint_every: Optional[int] = None
  data_parallel: int = 0
  keep_checkpoints: bool = False
  progress: bool = True
  matmul_precision: MatmulPrecision = "default"

  def replace(self, **changes: Any) -> "Config":
    """A copy with ``changes`` applied, validated."""
    return validate(dataclasses.replace(self, **changes))

  def lams(self, method: str) -> tuple[float, ...]:
    """The strength sweep of ``method`` (``(0.0,)`` for unregularised ones)."""
    field = LAM_FIELDS.get(method)
    return (0.0,) if field is None else getattr(self, field)

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict of every field."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def from_json(values: dict[str, Any]) -> Config:
  """The inverse of :meth:`Config.to_json`: lists become tuples, validated.

  Fields missing from ``values`` (a file written before they existed) take
  their defaults.

  Raises:
    ValueError: an unknown field, or a value that :func:`validate` rejects.
  """
  if not isinstance(values, dict):
    raise ValueError(
        f"a saved config must be a JSON object, got {type(values).__name__}.")
  hints = typing.get_type_hints(Config)
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ValueError(
        f"unknown config field(s) {unknown}; valid fields: "
        f"{', '.join(sorted(hints))}.")
  return validate(Config(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in values.items()}))


def differences(saved: Config, new: Config,
                ignore: tuple[str, ...] = RESULT_NEUTRAL
                ) -> list[tuple[str, Any, Any]]:
  """The fields where two configs differ, as ``(field, saved, new)``.

  Args:
    saved: the configuration a run was started with.
    new: the configuration it would continue with.
    ignore: fields that may differ (by default those that never change
      results, :data:`RESULT_NEUTRAL`).

  Returns:
    The differing fields, in declaration order.
  """
  return [(f.name, getattr(saved, f.name), getattr(new, f.name))
          for f in dataclasses.fields(Config)
          if f.name not in ignore
          and getattr(saved, f.name) != getattr(new, f.name)]


def _check_type(name: str, value: Any, kind: Any) -> None:
  """Raises a ValueError naming ``name`` unless ``value`` is a ``kind``."""
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin is typing.Union:  # Optional[X]
    if value is not None:
      _check_type(name, value, next(a for a in args if a is not type(None)))
    return
  if origin is tuple:
    if not isinstance(value, tuple):
      raise ValueError(
          f"{name} must be a tuple, got {type(value).__name__} {value!r}.")
    for item in value:
      _check_type(f"each entry of {name}", item, args[0])
    return
  if origin is Literal:  # the choice itself: _check_choices, by name
    kind = type(args[0])
  valid = {
      bool: isinstance(value, bool),
      int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
      float: isinstance(value, numbers.Real) and not isinstance(value, bool),
      str: isinstance(value, str),
  }[kind]
  if not valid:
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ValueError(
        f"{name} must be {article} {kind.__name__}, got "
        f"{type(value).__name__} {value!r}.")
  if kind is float and not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")


def validate(config: Config) -> Config:
  """Checks the fields that would otherwise fail late or silently.

  Args:
    config: the configuration.

  Returns:
    ``config`` unchanged.

  Raises:
    ValueError: naming the offending field.
  """
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    _check_type(field.name, getattr(config, field.name), hints[field.name])
  _check_choices(config)
  _check_ranges(config)
  _check_sweeps(config)
  return config


def _check_choices(config: Config) -> None:
  """Names (methods, dataset, tasks, estimator, model, optimizer)."""
  unknown = [m for m in config.methods if m not in METHODS]
  if unknown or not config.methods:
    raise ValueError(
        f"methods must be a non-empty list from {METHODS}; got "
        f"{list(config.methods)}.")
  twice = sorted({m for m in config.methods if config.methods.count(m) > 1})
  if twice:
    raise ValueError(
        f"methods lists {', '.join(twice)} more than once "
        f"({list(config.methods)}); each method runs once per lambda and "
        "seed: name it once.")
  if config.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(
        f"matmul_precision must be one of {MATMUL_PRECISIONS}, got "
        f"{config.matmul_precision!r}.")
  for field, valid in (("dataset", data.DATASET_NAMES),
                       ("tasks", tasks.TASK_KINDS),
                       ("fisher", ewc_jax.ESTIMATORS)):
    if getattr(config, field) not in valid:
      raise ValueError(
          f"{field} must be one of {valid}, got {getattr(config, field)!r}.")
  if config.tasks.startswith("split_") and config.num_tasks > 5:
    raise ValueError(
        f"tasks={config.tasks} has at most 5 tasks (pairs of digits); got "
        f"num_tasks={config.num_tasks}: pass --num-tasks 5 (or fewer).")
  if config.pad_to is not None and (
      config.pad_to < 28 or config.tasks != "permuted"
      or config.model != "mlp"):
    raise ValueError(
        f"pad_to must be None or >= 28, with tasks=permuted and model=mlp; "
        f"got pad_to={config.pad_to}, tasks={config.tasks}, "
        f"model={config.model}.")
  if config.kfac_fisher is not None and (
      config.kfac_fisher not in ewc_jax.ESTIMATORS
      or config.kfac_fisher == "batched"):
    raise ValueError(
        f"kfac_fisher must be None or an estimator of ewc_jax.kfac_fisher "
        f"(not batched), got {config.kfac_fisher!r}.")
  kfac = [m for m in config.methods if "kfac" in m]
  if kfac and (config.kfac_fisher or config.fisher) == "batched":
    raise ValueError(
        f"{kfac[0]} needs a per-example estimator: fisher=batched has no "
        "Kronecker factors; set kfac_fisher (exact, sampled, empirical).")
  if config.model not in models.MODELS:
    raise ValueError(
        f"model must be one of {models.MODELS}, got {config.model!r}.")
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(
        f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}.")


def _check_ranges(config: Config) -> None:
  """Sizes, rates and fractions."""
  for name in ("num_tasks", "batch_size", "epochs", "eval_batch_size",
               "fisher_batch_size", "cnn_hidden"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}.")
  if config.data_parallel < 0:
    raise ValueError(
        f"data_parallel must be >= 0 (0: all devices), got "
        f"{config.data_parallel}.")
  for name in ("hidden", "channels"):
    if any(width < 1 for width in getattr(config, name)):
      raise ValueError(
          f"{name} (layer widths) must all be >= 1, got "
          f"{list(getattr(config, name))}.")
  if config.model == "cnn" and not config.channels:
    raise ValueError("channels must name at least one convolution for "
                     "model=cnn (e.g. --channels 16 32).")
  if config.learning_rate <= 0:
    raise ValueError(
        f"learning_rate must be > 0, got {config.learning_rate}.")
  for name in ("b1", "b2", "momentum", "dropout"):
    if not 0.0 <= getattr(config, name) < 1.0:
      raise ValueError(
          f"{name} must be in [0, 1), got {getattr(config, name)}.")
  for name in ("iterations", "train_examples", "fisher_examples",
               "checkpoint_every"):
    value = getattr(config, name)
    if value is not None and value < 1:
      raise ValueError(f"{name} must be None or >= 1, got {value}.")


def _check_sweeps(config: Config) -> None:
  """Strength sweeps, gamma, SI's xi, seeds and the validation split."""
  for method, field in LAM_FIELDS.items():
    values = getattr(config, field)
    if not values or any(v < 0 for v in values):
      raise ValueError(
          f"{field} ({method}'s strength sweep) must be a non-empty list of "
          f"numbers >= 0, got {list(values)}.")
    if len(set(values)) != len(values):
      raise ValueError(
          f"{field} ({method}'s strength sweep) lists a value twice: "
          f"{list(values)}.")
  if not 0.0 < config.gamma <= 1.0:
    raise ValueError(f"gamma must be in (0, 1], got {config.gamma}.")
  if config.si_xi <= 0:
    raise ValueError(f"si_xi must be > 0, got {config.si_xi}.")
  if not config.seeds:
    raise ValueError("seeds must name at least one seed.")
  if any(not 0 <= seed < 2**32 for seed in config.seeds):
    raise ValueError(
        f"seeds must be integers in [0, 2**32), got {list(config.seeds)}.")
  if len(set(config.seeds)) != len(config.seeds):
    raise ValueError(f"seeds lists a seed twice: {list(config.seeds)}.")
  if not 0.0 < config.val_fraction < 1.0:
    raise ValueError(
        f"val_fraction must be in (0, 1) (lambda is chosen on the validation "
        f"split), got {config.val_fraction}.")


def presets() -> tuple[str, ...]:
  """The preset names: one module per preset in ``configs/``."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(configs.__path__)))


def get_config(preset: str = "quick") -> Config:
  """Returns a named preset (``configs/<preset>.py``'s ``get_config()``).

  Args:
    preset: one of :func:`presets`: ``quick`` (the default, minutes on a
      CPU), ``vandeven2019`` or ``kirkpatrick2017`` (the papers' protocols).

  Returns:
    The validated :class:`Config`.

  Raises:
    ValueError: an unknown preset (the valid ones are listed).
  """
  if preset not in presets():
    raise ValueError(
        f"unknown preset {preset!r}; choose one of {list(presets())}.")
  module = importlib.import_module(f"{configs.__name__}.{preset}")
  return validate(module.get_config())
