"""A dense layer's parameters as one ``[W; b]`` matrix, by path.

Every KFAC computation (the penalty, the pull, the per-task anchors) works
on ``Theta = [W; b]``, stacked ``(d_in (+1)) x d_out`` in float32, the
kernel transposed back when it is stored ``[d_out, d_in]``; the leaves are
found by their path (``tree.path_str``), so NNX states and pure dicts serve
alike.
"""

from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._src import tree as tree_lib
from ewc_jax._src.jaxpr.kronecker import DenseLayer


def rows(layer: DenseLayer) -> int:
  """The rows of ``[W; b]``: ``d_in``, plus one for a bias."""
  return layer.d_in + (layer.bias is not None)


def paths(layer: DenseLayer) -> list[str]:
  return [layer.kernel] + ([layer.bias] if layer.bias is not None else [])


def covered(layers) -> set:
  """The leaf paths that the layers' Kronecker blocks cover."""
  return {q for ly in layers for q in paths(ly)}


def matrix(layer: DenseLayer, leaves: dict) -> jax.Array:
  """``[W; b]`` as ``(d_in (+1)) x d_out`` float32, from ``{path: leaf}``."""
  w = jnp.asarray(tree_lib.value(leaves[layer.kernel]), jnp.float32)
  if layer.transposed:
    w = w.T
  if layer.bias is not None:
    w = jnp.concatenate([w, jnp.asarray(tree_lib.value(leaves[layer.bias]),
                                        jnp.float32)[None]])
  return w


def split(layer: DenseLayer, d: jax.Array) -> dict[str, Any]:
  """``{path: part}``: the kernel- and bias-shaped parts of a ``[W; b]``."""
  dw = d[:layer.d_in]
  out = {layer.kernel: dw.T if layer.transposed else dw}
  if layer.bias is not None:
    out[layer.bias] = d[layer.d_in]
  return out


def kernel_shape(layer: DenseLayer) -> tuple:
  return ((layer.d_out, layer.d_in) if layer.transposed
          else (layer.d_in, layer.d_out))


def check_leaves(layer: DenseLayer, leaves: dict, name: str = "params"):
  """Raises a ValueError unless ``leaves`` holds the layer's, well shaped."""
  missing = [q for q in paths(layer) if q not in leaves]
  if missing:
    raise ValueError(f"{name} lacks the layer leaves {missing[:3]} that "
                     "kfac_ewc's layers name.")
  shape = jnp.shape(tree_lib.value(leaves[layer.kernel]))
  if shape != kernel_shape(layer):
    raise ValueError(f"{name}{layer.kernel} has shape {shape}; the layer "
                     f"expects {kernel_shape(layer)}.")
  if layer.bias is not None:
    shape = jnp.shape(tree_lib.value(leaves[layer.bias]))
    if shape != (layer.d_out,):
      raise ValueError(f"{name}{layer.bias} has shape {shape}; the layer "
                       f"expects ({layer.d_out},).")
