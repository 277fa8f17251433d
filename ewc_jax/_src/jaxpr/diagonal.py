"""The diagonal Fisher's layers: the rule set of the layer-wise fast path.

The vmap path differentiates the whole network once per example and squares
``batch x #params`` gradients. The layer-wise path differentiates it once
per example with respect to the *outputs* of the layers that consume
parameters (cheap: ``batch x #activations``) and forms the squared
parameter gradients layer by layer (``layerwise.py``):

* a layer applied once per example (a dense layer on a vector, a bias, an
  elementwise scale), where each gradient entry is a single product
  ``a * delta``: ``sum_i g_i^2 = sum_i a_i^2 delta_i^2``, one batched VJP of
  the layer with squared inputs and squared output gradients, as
  ``(x^2)^T (delta^2)`` for ``y = x W`` (kfac-jax's dense diagonal block,
  BackPACK's SumGradSquared): an *identity* layer;
* any other use (a convolution, a dense layer applied per token, a weight
  used twice, an embedding lookup, a ``scan`` or a custom-derivative call
  that mixes parameters and the input): the per-example gradient
  ``G_i = X_i^T Delta_i`` of that layer alone, by one batched VJP of the
  layer (honouring a custom rule), then squared: a *material* layer.

A layer is any equation of the per-example jaxpr (``walker.py``) where
parameters and the input meet. A zero perturbation added to each layer's
floating outputs gives their gradients ``delta`` by one VJP; the layer's
recorded activation operands give the rest (``cut``: the network cut at its
layers, each evaluated on recorded inputs).
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._src.jaxpr import walker

_STRUCTURAL = ("convert_element_type", "reshape", "transpose", "squeeze",
               "expand_dims", "broadcast_in_dim", "copy", "copy_p")
_PRODUCTS = ("dot_general", "conv_general_dilated", "mul", "add", "add_any",
             "sub")


class Unsupported(Exception):
  """The model has a construct this path does not handle."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One equation where parameters and the input meet.

  Attributes:
    primitive: its primitive's name.
    leaves: the parameter leaves among its operands (indices).
    structural: those operands are the leaves at most cast or reshaped.
    out_avals: every output's abstract value.
    floating: per output, whether it is floating (perturbed, so that its
      gradient is known); integer outputs carry no gradient.
  """
  primitive: str
  leaves: frozenset
  structural: bool
  out_avals: tuple
  floating: tuple

  @property
  def pert_avals(self) -> list:
    return [a for a, f in zip(self.out_avals, self.floating) if f]


class Rules:
  """Evaluates the per-example jaxpr in one of two modes.

  ``"forward"``: the whole network; each layer's activation operands are
  recorded and ``perts[j]`` is added to layer ``j``'s floating outputs.
  ``"cut"``: only parameter computations and the layers themselves, with
  the layers' activation operands taken from ``acts`` (recorded before).
  """

  def __init__(self, mode, perts=None, acts=None, f32=False):
    self.mode, self.perts, self.acts, self.f32 = mode, perts, acts, f32
    self.layers: list[Layer] = []
    self.recorded: list[list[Any]] = []
    self.outs: list[list[Any]] = []

  def param(self, eqn, vals, tags):
    kinds = {t.kind for t in tags}
    structural = eqn.primitive.name in _STRUCTURAL and all(
        t.meta for t in tags if t.kind == walker.PARAM)
    tag = walker.Tag(walker.PARAM if walker.PARAM in kinds else walker.CONST,
                     frozenset().union(*(t.leaves for t in tags)),
                     structural)
    outs = walker.bind(eqn, vals, self.f32)
    return outs, [tag] * len(outs)

  def act(self, eqn, vals, tags):
    del tags
    if self.mode == "cut":
      return [None] * len(eqn.outvars)
    return walker.bind(eqn, vals, self.f32)

  def layer(self, eqn, vals, tags, uses):
    del uses
    j = len(self.layers)
    avals = tuple(v.aval for v in eqn.outvars)
    self.layers.append(Layer(
        eqn.primitive.name,
        frozenset().union(*(t.leaves for t in tags)),
        all(t.meta for t in tags if t.kind == walker.PARAM), avals,
        tuple(bool(jnp.issubdtype(a.dtype, jnp.inexact)) for a in avals)))
    out_tags = [walker.ACT_TAG] * len(avals)
    if self.mode == "cut":
      it = iter(self.acts[j])
      vals = [next(it) if t.kind == walker.ACT else v
              for v, t in zip(vals, tags)]
      outs = walker.bind(eqn, vals, self.f32)
      self.outs.append([o for o, f in zip(outs, self.layers[j].floating)
                        if f])
      return outs, out_tags
    self.recorded.append([v for v, t in zip(vals, tags)
                          if t.kind == walker.ACT])
    outs = walker.bind(eqn, vals, self.f32)
    if self.perts is None:
      return outs, out_tags
    it = iter(self.perts[j])
    return [o + next(it) if f else o
            for o, f in zip(outs, self.layers[j].floating)], out_tags


def _leaf_tags(n):
  return walker.leaf_tags(n, lambda i: True)


@dataclasses.dataclass
class LayerPlan:
  """The layers of one model, and which rule each leaf's sum takes."""
  jaxpr: Any
  consts: Any
  treedef: Any
  layers: list
  identity_layers: list  # layer ids whose single-product rule applies
  material_layers: list  # layer ids that need per-example layer gradients
  identity_leaves: list
  material_leaves: list


def forward(plan: LayerPlan, leaves, x, perts):
  """``(output, recorded acts)`` of one example, ``perts`` at the layers."""
  rules = Rules("forward", perts=perts)
  (out,), _ = walker.run(rules, plan.jaxpr, plan.consts, list(leaves) + [x],
                         _leaf_tags(len(leaves)))
  return out, rules.recorded


def cut(plan: LayerPlan, leaves, acts, f32=True) -> list:
  """Every layer's floating outputs, from its recorded activation operands."""
  rules = Rules("cut", acts=acts, f32=f32)
  walker.run(rules, plan.jaxpr, plan.consts, list(leaves) + [None],
             _leaf_tags(len(leaves)), f32)
  return rules.outs


def _single_product(plan, j, leaf_avals, act_avals) -> bool:
  """Is every entry of layer j's per-example gradient a single product?

  Evaluated on ones: a multilinear layer then gives, per entry, the number
  of products summed into it (with its sign).
  """
  with jax.ensure_compile_time_eval():
    leaves = [jnp.ones(a.shape, jnp.float32) for a in leaf_avals]
    acts = [[jnp.ones(a.shape, jnp.float32 if jnp.issubdtype(
        a.dtype, jnp.floating) else a.dtype) for a in layer]
            for layer in act_avals]
    (leaf,) = plan.layers[j].leaves

    def out(x):
      lv = list(leaves)
      lv[leaf] = x
      return cut(plan, lv, acts)[j]

    primal, vjp = jax.vjp(out, leaves[leaf])
    (counts,) = vjp([jnp.ones_like(o) for o in primal])
    return bool(np.all(np.abs(np.asarray(counts)) == 1.0))


def _analyse(apply_fn, params, example) -> LayerPlan:
  closed, treedef = walker.trace(apply_fn, params, example)
  leaves = jax.tree.leaves(params)
  rules = Rules("forward")
  outs_tags = []

  def walk(leaves_in, x):
    outs, tags = walker.run(rules, closed.jaxpr, closed.consts,
                            list(leaves_in) + [x], _leaf_tags(len(leaves)))
    outs_tags.extend(tags)
    return outs, rules.recorded

  _, act_avals = jax.eval_shape(
      walk, [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p))
             for p in leaves],
      jax.ShapeDtypeStruct(example.shape, example.dtype))
  if len(outs_tags) != 1 or outs_tags[0].kind != walker.ACT:
    raise Unsupported(
        "the logits do not depend on the input through a layer")
  layers = rules.layers
  plan = LayerPlan(closed.jaxpr, closed.consts, treedef, layers, [], [], [],
                   [])
  uses: dict[int, list[int]] = {}
  for j, layer in enumerate(layers):
    for leaf in layer.leaves:
      uses.setdefault(leaf, []).append(j)
  leaf_avals = [jax.ShapeDtypeStruct(jnp.shape(p), jnp.float32)
                for p in leaves]
  for leaf, js in sorted(uses.items()):
    j = js[0]
    layer = layers[j]
    if (len(js) == 1 and layer.leaves == {leaf} and layer.structural
        and layer.primitive in _PRODUCTS
        and _single_product(plan, j, leaf_avals, act_avals)):
      plan.identity_layers.append(j)
      plan.identity_leaves.append(leaf)
    else:
      plan.material_leaves.append(leaf)
      plan.material_layers.extend(k for k in js
                                  if k not in plan.material_layers)
  return plan


def plan_for(apply_fn, params, example) -> LayerPlan:
  """The (cached) layer plan of ``apply_fn`` on examples like ``example``."""
  return walker.cached("diagonal", apply_fn, params, example,
                       lambda: _analyse(apply_fn, params, example))


def unsupported_reason(apply_fn, params, inputs) -> Optional[str]:
  """None when the fast path handles this model, else why it does not."""
  if not hasattr(inputs, "shape"):
    return "the inputs are a pytree; the fast path takes one input array"
  try:
    plan_for(apply_fn, params, jax.ShapeDtypeStruct(inputs.shape[1:],
                                                    inputs.dtype))
  except Unsupported as e:
    return str(e)
  except Exception as e:  # noqa: BLE001 (any tracing failure means fallback)
    return f"{type(e).__name__}: {e}"
  return None
