"""Flax NNX classifiers for the experiments, and their pure functional form.

Training, evaluation and the Fisher pass all go through one pure function,
``apply_model(graphdef, params, x, key)``: ``key=None`` is evaluation mode
(dropout off), a PRNG key turns dropout on. The model object is only used to
build the parameters; nothing mutates it afterwards, so the Fisher pass cannot
change any model state (see :func:`ewc_jax.fisher_diagonal`).
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MODELS = ("mlp", "cnn")

# Logit given to classes outside a task's head. Finite (not -inf) so that
# softmax gives exactly 0 without 0 * inf = NaN in gradients.
MASKED_LOGIT = -1e9


class MLP(nnx.Module):
  """A ReLU multilayer perceptron on flattened images.

  Attributes:
    layers: the dense layers, hidden ones first, the output layer last.
    dropout: dropout applied after every hidden activation.
  """

  def __init__(self, in_features: int, hidden: Sequence[int],
               num_classes: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      in_features: size of a flattened input (784 for MNIST).
      hidden: widths of the hidden layers, e.g. ``(400, 400)``.
      num_classes: number of logits.
      dropout: dropout rate after each hidden layer (training only).
      rngs: parameter initialisation keys.
    """
    sizes = [in_features, *hidden, num_classes]
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, key: Optional[jax.Array] = None):
    """Logits ``[batch, classes]``; dropout is on only when ``key`` is given."""
    x = x.reshape(x.shape[0], -1)
    keys = _layer_keys(key, len(self.layers) - 1)
    for layer, k in zip(self.layers[:-1], keys, strict=True):
      x = self.dropout(jax.nn.relu(layer(x)), deterministic=k is None, rngs=k)
    return self.layers[-1](x)


class CNN(nnx.Module):
  """A small convolutional network: two strided 3x3 convolutions, one dense.

  Attributes:
    convs: the convolutions (stride 2, so 28x28 becomes 7x7).
    hidden: the dense hidden layer.
    head: the output layer.
    dropout: dropout before the output layer.
  """

  def __init__(self, channels: Sequence[int], hidden: int, num_classes: int,
               *, dropout: float = 0.0, rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      channels: output channels of each convolution, e.g. ``(16, 32)``.
      hidden: width of the dense layer after the convolutions.
      num_classes: number of logits.
      dropout: dropout rate before the output layer (training only).
      rngs: parameter initialisation keys.
    """
    ins = [1, *channels[:-1]]
    self.convs = nnx.List([
        nnx.Conv(a, b, (3, 3), strides=(2, 2), rngs=rngs)
        for a, b in zip(ins, channels, strict=True)])
    side = 28
    for _ in channels:
      side = -(-side // 2)
    self.hidden = nnx.Linear(channels[-1] * side * side, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, key: Optional[jax.Array] = None):
    """Logits ``[batch, classes]`` for images ``[batch, 28, 28]``."""
    x = x[..., None]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
    x = self.dropout(x, deterministic=key is None, rngs=key)
    return self.head(x)


def _layer_keys(key, n):
  if key is None:
    return [None] * n
  return list(jax.random.split(key, n))


def make_model(name: str, num_classes: int, *, seed: int,
               hidden: Sequence[int] = (100, 100), dropout: float = 0.0,
               channels: Sequence[int] = (16, 32),
               cnn_hidden: int = 128,
               in_features: int = 28 * 28) -> nnx.Module:
  """Builds a model by name.

  Args:
    name: ``"mlp"`` or ``"cnn"``.
    num_classes: number of logits.
    seed: seed of the parameter initialisation.
    hidden: the MLP's hidden widths.
    dropout: dropout rate (training only).
    channels: the CNN's convolution channels.
    cnn_hidden: the CNN's dense width.
    in_features: the MLP's flattened input size (1024 for 32x32 padding).

  Returns:
    The NNX module.
  """
  rngs = nnx.Rngs(params=seed)
  if name == "mlp":
    return MLP(in_features, tuple(hidden), num_classes, dropout=dropout,
               rngs=rngs)
  if name == "cnn":
    return CNN(tuple(channels), cnn_hidden, num_classes, dropout=dropout,
               rngs=rngs)
  raise ValueError(f"model must be one of {MODELS}, got {name!r}.")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any]:
  """Splits a model into its (hashable) graph definition and its parameters.

  Args:
    model: a module whose only state is ``nnx.Param`` (true for :class:`MLP`
      and :class:`CNN`: dropout takes its key as an argument).

  Returns:
    ``(graphdef, params)``.

  Raises:
    ValueError: the model holds state other than parameters (e.g. batch-norm
      statistics), which the pure functions here would silently drop.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        "split_model supports models whose only state is nnx.Param; found "
        f"other state: {rest}.")
  return graphdef, params


def apply_model(graphdef: nnx.GraphDef, params: Any, x: jax.Array,
                key: Optional[jax.Array] = None) -> jax.Array:
  """Runs the model purely: logits ``[batch, classes]``.

  Args:
    graphdef: from :func:`split_model`.
    params: the parameters (any values shaped like the model's).
    x: images ``[batch, 28, 28]``.
    key: ``None`` for evaluation mode (dropout off); a PRNG key to train.

  Returns:
    The logits.
  """
  return nnx.merge(graphdef, params)(x, key)


def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Sets the logits outside a task's head to :data:`MASKED_LOGIT`.

  Args:
    logits: ``[batch, classes]``.
    class_mask: boolean ``[classes]`` or ``[batch, classes]``; True = active.

  Returns:
    The masked logits (no gradient flows into the masked-out entries).
  """
  return jnp.where(class_mask, logits, MASKED_LOGIT)


@functools.lru_cache(maxsize=None)
def eval_apply_fn(graphdef: nnx.GraphDef, classes: Optional[tuple[int, ...]]
                  = None, num_classes: Optional[int] = None):
  """``apply_fn(params, x) -> logits`` in evaluation mode, for the Fisher.

  Cached on its arguments: :func:`ewc_jax.fisher_diagonal` compiles once per
  ``apply_fn`` object, so every task, method and seed with the same head
  reuses one compiled Fisher step.

  Args:
    graphdef: from :func:`split_model`.
    classes: the task's active classes (task-incremental heads); ``None``
      for all.
    num_classes: the number of logits; needed with ``classes``.

  Returns:
    A pure function of ``(params, x)``; dropout is off.
  """
  if classes is None or len(classes) == num_classes:
    return lambda params, x: apply_model(graphdef, params, x)
  mask = tuple(c in classes for c in range(num_classes))
  return lambda params, x: mask_logits(
      apply_model(graphdef, params, x), jnp.asarray(mask))
