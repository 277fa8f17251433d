"""Per-example sums of squared gradients without per-example gradients.

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
``add``, ``mul``, ...) are the layers. Calls (``jit``, ``custom_jvp``) that mix
both are inlined. A zero perturbation added to each layer output gives the
output gradients ``delta`` by one VJP; the recorded layer inputs give the
rest. Tracing the jaxpr rather than asking the model to ``sow`` or
``perturb`` (Flax) or matching graph patterns (kfac-jax) works for any
``apply_fn``: NNX, Linen or plain functions, with no change to the model.

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

from ewc_jax._src import fisher as fisher_lib

_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint")
_STRUCTURAL = ("convert_element_type", "reshape", "transpose", "squeeze",
               "expand_dims", "broadcast_in_dim", "copy", "copy_p")
_PRODUCTS = ("dot_general", "conv_general_dilated", "mul", "add", "add_any",
             "sub")

CONST, PARAM, ACT = 0, 1, 2
SUB_CHUNK = 64


class _Unsupported(Exception):
  """The model has a construct this path does not handle."""


@dataclasses.dataclass(frozen=True)
class _Info:
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


def _bind(eqn, invals, f32):
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


class _Interpreter:
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
        return val, _Info(CONST)
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = (_to_f32(c) if self.f32 else c, _Info(CONST))
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
        info = _Info(PARAM if PARAM in kinds else CONST, leaves, structural)
        outs = _bind(eqn, vals, self.f32)
        outs_info = [info] * len(outs)
      elif PARAM not in kinds:
        outs_info = [_Info(ACT)] * len(eqn.outvars)
        outs = ([None] * len(eqn.outvars) if self.mode == "cut"
                else _bind(eqn, vals, self.f32))
      elif name in _CALLS and _sub_jaxpr(eqn) is not None:
        sub, sub_consts = _sub_jaxpr(eqn)
        outs, outs_info = self.run(sub, sub_consts, vals, ins)
      elif _sub_jaxpr(eqn) is not None or eqn.params.get("branches"):
        # Control flow (scan, while, cond) mixing parameters and inputs: its
        # per-example gradient is a whole sub-network's; leave it to vmap.
        raise _Unsupported(
            f"parameters enter the input's computation inside `{name}`, "
            "which the layer-wise path does not differentiate per example")
      else:
        outs = self._layer(eqn, vals, ins)
        outs_info = [_Info(ACT)] * len(outs)
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
      outs = _bind(eqn, vals, self.f32)
      self.outs.append(outs)
      return outs
    self.recorded.append([v for v, i in zip(vals, ins) if i.kind == ACT])
    outs = _bind(eqn, vals, self.f32)
    if self.perts is None:
      return outs
    return [o + p for o, p in zip(outs, self.perts[j])]


@dataclasses.dataclass
class _Plan:
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


def _cut(plan, leaves, acts, f32=True):
  interp = _Interpreter("cut", acts=acts, f32=f32)
  infos = [_Info(PARAM, frozenset([i]), True) for i in range(len(leaves))]
  infos.append(_Info(ACT))
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
      return _cut(plan, lv, acts)[j]

    primal, vjp = jax.vjp(out, leaves[leaf])
    (counts,) = vjp([jnp.ones_like(o) for o in primal])
    return bool(np.all(np.abs(np.asarray(counts)) == 1.0))


def _analyse(apply_fn, params, example) -> _Plan:
  closed, leaves, treedef = _trace(apply_fn, params, example)
  jaxpr = closed.jaxpr
  interp = _Interpreter("forward")
  infos = [_Info(PARAM, frozenset([i]), True) for i in range(len(leaves))]
  infos.append(_Info(ACT))
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
    raise _Unsupported(
        "the logits do not depend on the input through a layer")
  layers = interp.layers
  plan = _Plan(jaxpr, closed.consts, treedef, layers, [], [], [], [])
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


_PLANS: dict = {}  # (apply_fn, shapes) -> _Plan, oldest first
_MAX_PLANS = 64


def _plan(apply_fn, params, example) -> _Plan:
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
    _plan(apply_fn, params, jax.ShapeDtypeStruct(inputs.shape[1:],
                                                 inputs.dtype))
  except _Unsupported as e:
    return str(e)
  except Exception as e:  # noqa: BLE001 (any tracing failure means fallback)
    return f"{type(e).__name__}: {e}"
  return None


def chunk_sum(apply_fn, estimator, num_samples, params, inputs, labels, keys,
              mask):
  """``sum_i sum_k w_ik g_ik^2`` over a chunk, by the layer-wise identities.

  Same contract as the vmap path in ``fisher.py``; float32 result.
  """
  plan = _plan(apply_fn, params,
               jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype))
  leaves = jax.tree.leaves(params)
  # Sub-chunks keep the per-class output gradients (batch x K x activations)
  # in cache; a carried, indexed chunk beats a scanned slice on XLA:CPU.
  size = fisher_lib._group_size(inputs.shape[0], SUB_CHUNK)

  def body(i, acc):
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * size, size)
    part = _sub_chunk_sum(plan, leaves, estimator, num_samples, take(inputs),
                          take(labels), take(keys), take(mask))
    return [a + b for a, b in zip(acc, part)]

  out = jax.lax.fori_loop(
      0, inputs.shape[0] // size, body,
      [jnp.zeros(jnp.shape(p), jnp.float32) for p in leaves])
  return jax.tree.unflatten(plan.treedef, out)


def _sub_chunk_sum(plan, leaves, estimator, num_samples, inputs, labels, keys,
                   mask):
  zero_perts = [[jnp.zeros(a.shape, a.dtype) for a in layer.out_avals]
                for layer in plan.layers]

  def per_example(x, y, key, m):
    def forward(perts):
      interp = _Interpreter("forward", perts=perts)
      infos = [_Info(PARAM, frozenset([i]), True) for i in range(len(leaves))]
      infos.append(_Info(ACT))
      (logits,), _ = interp.run(plan.jaxpr, plan.consts,
                                list(leaves) + [x], infos)
      return logits, interp.recorded

    logits, vjp_fn, acts = jax.vjp(forward, zero_perts, has_aux=True)
    u, w = fisher_lib.log_likelihood_cotangents(logits, y, key, estimator,
                                                num_samples)
    (deltas,) = jax.vmap(vjp_fn)(u.astype(logits.dtype))
    return acts, deltas, w * m

  acts, deltas, w = jax.vmap(per_example)(inputs, labels, keys, mask)
  f32_leaves = [jnp.asarray(p, jnp.float32) for p in leaves]
  out = [jnp.zeros(jnp.shape(p), jnp.float32) for p in leaves]

  if plan.identity_layers:
    ids = plan.identity_layers
    sq_acts = [[jnp.square(a.astype(jnp.float32)) for a in layer]
               for layer in acts]
    d2 = [[jnp.einsum("bk,bk...->b...", w, jnp.square(d.astype(jnp.float32)))
           for d in deltas[j]] for j in ids]

    def layer_outs(sub):
      lv = list(f32_leaves)
      for leaf, x in zip(plan.identity_leaves, sub):
        lv[leaf] = x
      per = jax.vmap(lambda a: [_cut(plan, lv, a)[j] for j in ids])(sq_acts)
      return per

    _, vjp = jax.vjp(layer_outs,
                     [f32_leaves[leaf] for leaf in plan.identity_leaves])
    (grads,) = vjp(d2)
    for leaf, g in zip(plan.identity_leaves, grads):
      out[leaf] = jnp.abs(g)

  if plan.material_layers:
    mids = plan.material_layers

    def one(a, ds, wk):
      def layer_outs(sub):
        lv = list(f32_leaves)
        for leaf, x in zip(plan.material_leaves, sub):
          lv[leaf] = x
        acts32 = [[v.astype(jnp.float32) for v in layer] for layer in a]
        outs = _cut(plan, lv, acts32)
        return [outs[j] for j in mids]

      sub = [f32_leaves[leaf] for leaf in plan.material_leaves]
      _, vjp = jax.vjp(layer_outs, sub)

      def body(acc, k):
        cot = [[d[k].astype(jnp.float32) for d in ds_j] for ds_j in ds]
        (g,) = vjp(cot)
        return [c + wk[k] * jnp.square(gi) for c, gi in zip(acc, g)], None

      acc, _ = jax.lax.scan(body, [jnp.zeros_like(s) for s in sub],
                            jnp.arange(wk.shape[0]))
      return acc

    per = jax.vmap(one)(acts, [deltas[j] for j in mids], w)
    for leaf, s in zip(plan.material_leaves, per):
      out[leaf] = jnp.sum(s, 0)

  return out
