"""Memory a run needs, estimated before anything is allocated.

A task stream holds every task's images on the device (and, while it is
built, on the host), so ``--num-tasks 1000000`` asks for terabytes; the OOM
killer would end such a run without a word. :func:`check_memory` estimates
the bytes up front and refuses, in one line, a run that cannot fit.

Estimate. ``T`` tasks of ``n`` training and ``m`` test images of ``d``
float32 pixels: the stream is ``4 T (n + m) d`` bytes (split kinds: each
example once, ``4 (n + m) d``), twice with ``joint`` (its union of every
task's training data); the host builds the same arrays first. Training
holds about 12 float32 copies of the ``P`` parameters per member (params,
Adam's two moments, gradients, EWC anchor and Fisher sums, SI's path
integral and start), ``K`` members in a vmapped sweep. KFAC-EWC adds, per
member, its factors: for each 2-D kernel ``[d_in, d_out]`` (taken as a
dense layer with bias, ``n = d_in + 1``; an upper bound) ``n^2 + d_out^2``
float32 per slot, plus ``n d_out`` per slot in separate mode (the task's
anchor); one slot for pooled factors, ``num_tasks`` for a per-task store
(``kfac_ewc``, ``online_kfac_ewc_sum``). Methods run one after another, so
the largest store counts.
"""

import os
from typing import Optional

import jax
import numpy as np

from experiments import data as data_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import methods as methods_lib
from experiments.permuted_mnist import models

# float32 copies of the parameters a training run holds (see above).
STATE_COPIES = 12


class MemoryBudgetError(ValueError):
  """A run that would not fit in memory (one-line message)."""


def _param_shapes(config: config_lib.Config,
                  num_classes: int) -> list[tuple[int, ...]]:
  """The model's parameter shapes (nothing allocated)."""
  from flax import nnx  # noqa: PLC0415 (only here)

  model = nnx.eval_shape(lambda: models.make_model(
      config.model, num_classes, seed=0, hidden=config.hidden,
      dropout=config.dropout, channels=config.channels,
      cnn_hidden=config.cnn_hidden,
      in_features=int(np.prod(methods_lib.input_shape(config)))))
  return [tuple(x.shape)
          for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def num_params(config: config_lib.Config, num_classes: int) -> int:
  """The model's parameter count, from shapes alone (nothing allocated)."""
  return sum(int(np.prod(s)) for s in _param_shapes(config, num_classes))


def kfac_store_bytes(config: config_lib.Config, num_classes: int) -> int:
  """Bytes of the largest KFAC-EWC store among ``config.methods`` (one
  member; 0 without KFAC methods)."""
  kernels = [s for s in _param_shapes(config, num_classes) if len(s) == 2]
  largest = 0
  for name in config.methods:
    method = methods_lib.get(name)
    if method.optimizer is not methods_lib.kfac_optimizer:
      continue
    slots = methods_lib.kfac_max_tasks(method, config) or 1
    anchors = method.mode == "separate"
    per_slot = sum((d_in + 1) ** 2 + d_out ** 2
                   + (anchors and (d_in + 1) * d_out)
                   for d_in, d_out in kernels)
    largest = max(largest, 4 * slots * per_slot)
  return largest


def estimate_bytes(config: config_lib.Config, dataset: data_lib.Dataset,
                   members: int = 1) -> dict[str, int]:
  """Bytes of the task stream and of the training state.

  Args:
    config: the configuration.
    dataset: the source data (its sizes).
    members: runs trained at once (a vmapped sweep's ``K``).

  Returns:
    ``{"data": ..., "state": ..., "kfac": ...}`` in bytes (``state``
    includes ``kfac``, the KFAC-EWC store).
  """
  pixels = int(np.prod(dataset.train_x.shape[1:]))
  n_train = len(dataset.train_y)
  if config.train_examples is not None:
    n_train = min(n_train, config.train_examples)
  copies = 1 if config.tasks.startswith("split_") else config.num_tasks
  data = 4 * copies * (n_train + len(dataset.test_y)) * pixels
  if "joint" in config.methods:
    data += 4 * copies * n_train * pixels
  num_classes = int(dataset.num_classes)
  kfac = members * kfac_store_bytes(config, num_classes)
  state = 4 * STATE_COPIES * members * num_params(config, num_classes) + kfac
  return {"data": data, "state": state, "kfac": kfac}


def available_bytes() -> Optional[int]:
  """Host memory available now (psutil, else ``sysconf``); ``None`` if
  unknown."""
  try:
    import psutil  # noqa: PLC0415 (optional)
    return int(psutil.virtual_memory().available)
  except ImportError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_bytes() -> Optional[int]:
  """The first accelerator's memory limit; ``None`` on a CPU or if
  unknown."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  try:
    return int(device.memory_stats()["bytes_limit"])
  except (KeyError, TypeError, AttributeError, RuntimeError):
    return None


def _gib(n: int) -> str:
  return f"{n / 2**30:.1f} GiB"


def check_memory(config: config_lib.Config, dataset: data_lib.Dataset,
                 members: int = 1) -> None:
  """Refuses a run whose estimated memory exceeds what is available.

  On a CPU the stream's host and device copies share the host's memory;
  on an accelerator the device copy and the state must fit its memory.

  Raises:
    MemoryBudgetError: naming the estimate, what is available, and the
      fields that drive it.
  """
  need = estimate_bytes(config, dataset, members)
  limits = []
  host, device = available_bytes(), device_bytes()
  if device is None:
    limits.append(("host", 2 * need["data"] + need["state"], host))
  else:
    limits.append(("host", need["data"], host))
    limits.append(("device", need["data"] + need["state"], device))
  for where, want, have in limits:
    if have is not None and want > have:
      kfac = (f", of which KFAC-EWC's per-task factors {_gib(need['kfac'])}"
              if need["kfac"] else "")
      raise MemoryBudgetError(
          f"this run needs about {_gib(want)} of {where} memory (task data "
          f"{_gib(need['data'])} for num_tasks={config.num_tasks}, training "
          f"state {_gib(need['state'])}{kfac}), more than the {_gib(have)} "
          "available; lower num_tasks, train_examples or the model size"
          + (", or run online_kfac_ewc (pooled factors, constant memory)"
             if need["kfac"] else "") + ".")
