"""The layer-wise path's tracer: finds the layers of any ``apply_fn``.

Per-example sums of squared gradients without per-example gradients
(the sums themselves are formed in ``fast.py``).

The vmap path differentiates the whole network once per example and squares
``batch x #params`` gradients. This path differentiates it once per example
with respect to the *outputs* of the layers that consume parameters (cheap:
``batch x #activations``) and then forms the squared parameter gradients
layer by layer:

* a layer applied once per example (a dense layer on a vector, a bias, an
  elementwise scale), where each gradient entry is a single product
  ``a * delta``: ``sum_i g_i^2 = sum_i a_i^2 delta_i^2``, one batched VJP of
  the layer with squared inputs and squared output gradients, as
  ``(x^2)^T (delta^2)`` for ``y = x W`` (kfac-jax's dense diagonal block,
  BackPACK's SumGradSquared);
* any other use (a convolution, a dense layer applied per token, a weight used
  twice): the per-example gradient ``G_i = X_i^T Delta_i`` of that layer alone,
  formed by one batched VJP of the layer, then squared.

How it finds the layers: ``apply_fn`` is traced on ONE example to a jaxpr
(so no operation can mix examples), each equation is classified by what its
operands depend on (parameters only, the input, or both), and the equations
with operands of both kinds (``dot_general``, ``conv_general_dilated``,
``add``, ``mul``, ...) are the layers. Calls (``jit``, ``remat``) that mix
both are inlined; a ``custom_jvp``/``custom_vjp`` call that mixes both (a
straight-through estimator, say) has a derivative rule of its own that
inlining would ignore, so such a model falls back to the vmap path. A zero
perturbation added to each layer output gives the output gradients
``delta`` by one VJP; the recorded layer inputs give the rest. Tracing the
jaxpr rather than asking the model to ``sow`` or ``perturb`` (Flax) or
matching graph patterns (kfac-jax) works for any ``apply_fn``: NNX, Linen or
plain functions, with no change to the model.

The Fisher's estimator enters only through output cotangents: for
``K`` cotangent vectors ``u_k`` with weights ``w_k`` per example (``K = C``
classes for the exact Fisher), the VJPs reuse one forward pass, and the
single-product layers need only ``sum_k w_k delta_k^2`` per layer.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
_CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
           "custom_lin")
_STRUCTURAL = ("convert_element_type", "reshape", "transpose", "squeeze",
               "expand_dims", "broadcast_in_dim", "copy", "copy_p")
_PRODUCTS = ("dot_general", "conv_general_dilated", "mul", "add", "add_any",
             "sub")

CONST, PARAM, ACT = 0, 1, 2


class Unsupported(Exception):
  """The model has a construct this path does not handle."""


@dataclasses.dataclass(frozen=True)
class Info:
  kind: int
  leaves: frozenset = frozenset()
  structural: bool = True  # param-derived through layout-only operations


@dataclasses.dataclass
class _Layer:
  """One parameter-consuming equation found in the jaxpr."""
  primitive: str
  leaves: frozenset
  structural: bool
  out_avals: list


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is not None:
      if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, sub.consts
      if isinstance(sub, jcore.Jaxpr):
        return sub, ()
  return None


def bind(eqn, invals, f32: bool = False):
  """Binds ``eqn``'s primitive to ``invals`` (sums in float32 if ``f32``)."""
  params = dict(eqn.params)
  if f32:
    # Squares and their sums in float32 even for low-precision models.
    for key in ("preferred_element_type", "new_dtype"):
      dt = params.get(key)
      if dt is not None and jnp.issubdtype(dt, jnp.floating):
        params[key] = jnp.dtype(jnp.float32)
  bind_params = eqn.primitive.get_bind_params(params)
  if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
    subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _to_f32(x):
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.asarray(x, jnp.float32)
  return x


class Interpreter:
  """Evaluates a per-example jaxpr in one of two modes.

  ``"forward"``: the whole network; each layer's act operands are recorded
  and ``perts[j]`` is added to layer ``j``'s outputs.
  ``"cut"``: only parameter computations and the layers themselves, with the
  layers' act operands taken from ``acts`` (the network cut at its layers).
  """

  def __init__(self, mode, perts=None, acts=None, f32=False):
    self.mode, self.perts, self.acts, self.f32 = mode, perts, acts, f32
    self.layers: list[_Layer] = []
    self.recorded: list[list[Any]] = []
    self.outs: list[list[Any]] = []

  def run(self, jaxpr, consts, args, infos):
    env = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        val = _to_f32(v.val) if self.f32 else v.val
        return val, Info(CONST)
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = (_to_f32(c) if self.f32 else c, Info(CONST))
    for v, a, i in zip(jaxpr.invars, args, infos):
      env[v] = (a, i)
    for eqn in jaxpr.eqns:
      vals, ins = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
      kinds = {i.kind for i in ins}
      name = eqn.primitive.name
      if ACT not in kinds:
        leaves = frozenset().union(*(i.leaves for i in ins))
        structural = name in _STRUCTURAL and all(
            i.structural for i in ins if i.kind == PARAM)
        info = Info(PARAM if PARAM in kinds else CONST, leaves, structural)
        outs = bind(eqn, vals, self.f32)
        outs_info = [info] * len(outs)
      elif PARAM not in kinds:
        outs_info = [Info(ACT)] * len(eqn.outvars)
        outs = ([None] * len(eqn.outvars) if self.mode == "cut"
                else bind(eqn, vals, self.f32))
      elif name in _CUSTOM:
        raise Unsupported(
            f"parameters and inputs meet inside `{name}` "
            f"({eqn.params.get('name', 'a custom derivative rule')}), whose "
            "own derivative rule the layer-wise path cannot apply")
      elif name in _CALLS and _sub_jaxpr(eqn) is not None:
        sub, sub_consts = _sub_jaxpr(eqn)
        outs, outs_info = self.run(sub, sub_consts, vals, ins)
      elif _sub_jaxpr(eqn) is not None or eqn.params.get("branches"):
        # Control flow (scan, while, cond) mixing parameters and inputs: its
        # per-example gradient is a whole sub-network's; leave it to vmap.
        raise Unsupported(
            f"parameters enter the input's computation inside `{name}`, "
            "which the layer-wise path does not differentiate per example")
      else:
        outs = self._layer(eqn, vals, ins)
        outs_info = [Info(ACT)] * len(outs)
      for v, o, i in zip(eqn.outvars, outs, outs_info):
        env[v] = (o, i)
    return zip(*[read(v) for v in jaxpr.outvars]) if jaxpr.outvars else (
        (), ())

  def _layer(self, eqn, vals, ins):
    j = len(self.layers)
    self.layers.append(_Layer(
        eqn.primitive.name,
        frozenset().union(*(i.leaves for i in ins)),
        all(i.structural for i in ins if i.kind == PARAM),
        [v.aval for v in eqn.outvars]))
    if self.mode == "cut":
      it = iter(self.acts[j])
      vals = [next(it) if i.kind == ACT else v for v, i in zip(vals, ins)]
      outs = bind(eqn, vals, self.f32)
      self.outs.append(outs)
      return outs
    self.recorded.append([v for v, i in zip(vals, ins) if i.kind == ACT])
    outs = bind(eqn, vals, self.f32)
    if self.perts is None:
      return outs
    return [o + p for o, p in zip(outs, self.perts[j])]


@dataclasses.dataclass
class LayerPlan:
  jaxpr: Any
  consts: Any
  treedef: Any
  layers: list
  identity_layers: list  # layer ids whose single-product rule applies
  material_layers: list  # layer ids that need per-example layer gradients
  identity_leaves: list
  material_leaves: list


def _per_example_fn(apply_fn, treedef):
  def fn(leaves, x):
    return apply_fn(jax.tree.unflatten(treedef, leaves), x[None])[0]
  return fn


def _trace(apply_fn, params, example):
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(_per_example_fn(apply_fn, treedef))(
      [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in leaves],
      jax.ShapeDtypeStruct(example.shape, example.dtype))
  return closed, leaves, treedef


def cut(plan, leaves, acts, f32=True):
  interp = Interpreter("cut", acts=acts, f32=f32)
  infos = [Info(PARAM, frozenset([i]), True) for i in range(len(leaves))]
  infos.append(Info(ACT))
  interp.run(plan.jaxpr, plan.consts, list(leaves) + [None], infos)
  return interp.outs


def _single_product(plan, j, leaf_avals, act_avals):
  """Is every entry of layer j's per-example gradient a single product?

  Evaluated on ones: a multilinear layer then gives, per entry, the number
  of products summed into it (with its sign).
  """
  with jax.ensure_compile_time_eval():
    leaves = [jnp.ones(a.shape, jnp.float32) for a in leaf_avals]
    acts = [[jnp.ones(a.shape, jnp.float32) for a in layer]
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
  closed, leaves, treedef = _trace(apply_fn, params, example)
  jaxpr = closed.jaxpr
  interp = Interpreter("forward")
  infos = [Info(PARAM, frozenset([i]), True) for i in range(len(leaves))]
  infos.append(Info(ACT))
  # Run abstractly: records the layers and checks the output's dependence.
  outs_info = []

  def walk(leaves_in, x):
    outs, oi = interp.run(jaxpr, closed.consts, list(leaves_in) + [x], infos)
    outs_info.extend(oi)
    return list(outs), interp.recorded

  _, act_shapes = jax.eval_shape(
      walk, [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p))
             for p in leaves],
      jax.ShapeDtypeStruct(example.shape, example.dtype))
  if len(outs_info) != 1 or outs_info[0].kind != ACT:
    raise Unsupported(
        "the logits do not depend on the input through a layer")
  layers = interp.layers
  plan = LayerPlan(jaxpr, closed.consts, treedef, layers, [], [], [], [])
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
        and _single_product(plan, j, leaf_avals, act_shapes)):
      plan.identity_layers.append(j)
      plan.identity_leaves.append(leaf)
    else:
      plan.material_leaves.append(leaf)
      plan.material_layers.extend(k for k in js
                                  if k not in plan.material_layers)
  return plan


_PLANS: dict = {}  # (apply_fn, shapes) -> LayerPlan, oldest first
_MAX_PLANS = 64


def plan_for(apply_fn, params, example) -> LayerPlan:
  key = (apply_fn, jax.tree.structure(params),
         tuple((jnp.shape(p), jnp.result_type(p))
               for p in jax.tree.leaves(params)),
         example.shape, example.dtype)
  if key not in _PLANS:
    if len(_PLANS) >= _MAX_PLANS:  # keep recent models alive, not all
      del _PLANS[next(iter(_PLANS))]
    _PLANS[key] = _analyse(apply_fn, params, example)
  return _PLANS[key]


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


