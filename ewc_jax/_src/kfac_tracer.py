"""Finds the plain dense layers of a model from its jaxpr, for KFAC.

``apply_fn`` is traced on ONE example (so no operation mixes examples) and
every value is classified by what it depends on: parameters only (``PARAM``),
the input (``ACT``) or neither. A *dense layer* is a ``dot_general`` with no
batch dimensions whose one operand is an activation holding exactly ``d_in``
numbers (one token per example) and whose other operand is a 2-D parameter
leaf, at most cast or transposed, that is used nowhere else. An optional
bias is an ``add`` right after it (the dot's only consumer) of a 1-D leaf of
``d_out`` entries, reshaped or broadcast without reordering, and used nowhere
else. Anything the tracer cannot prove is such a layer (a weight used twice,
a dense layer applied per token, a layer inside ``scan``/``while``/``cond``
or a custom-derivative call, a convolution) is left to the diagonal Fisher:
never a wrong Kronecker block.

Calls that preserve semantics (``pjit``, ``closed_call``, ``remat``) are
inlined when they mix parameters and activations; custom-derivative calls and
control flow are evaluated whole, so their derivatives stay exact.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ewc_jax._src import layers

_INLINE = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
_KERNEL_OPS = ("convert_element_type", "copy", "copy_p", "transpose")
_BIAS_OPS = ("convert_element_type", "copy", "copy_p", "reshape",
             "broadcast_in_dim", "squeeze", "expand_dims")
CONST, PARAM, ACT = 0, 1, 2


class DenseLayer(NamedTuple):
  """A dense layer ``y = x @ W (+ b)`` found in ``apply_fn`` (static data).

  Attributes:
    kernel: the pytree path of ``W`` (``jax.tree_util.keystr``).
    bias: the path of ``b``, or ``None`` for a layer without bias.
    kernel_index: ``W``'s position in ``jax.tree.leaves(params)``.
    bias_index: ``b``'s position, or ``None``.
    transposed: ``True`` when ``W`` is stored ``[d_out, d_in]`` (``x @ W.T``).
    d_in: input features (without the homogeneous coordinate).
    d_out: output features.
  """
  kernel: str
  bias: Optional[str]
  kernel_index: int
  bias_index: Optional[int]
  transposed: bool
  d_in: int
  d_out: int


@dataclasses.dataclass(frozen=True)
class _Info:
  kind: int
  leaves: frozenset = frozenset()
  chain: Optional[int] = None  # the one leaf this value is a cast/view of
  transposed: bool = False
  dot: Optional[int] = None  # output of candidate dot number `dot`
  single_use: bool = False
  bias_ok: bool = False  # the chain reshapes only (no transpose)
  kernel_ok: bool = False  # the chain casts or transposes only


class Plan(NamedTuple):
  """What the compute pass needs: the traced jaxpr and accepted layers."""
  jaxpr: Any
  consts: Any
  treedef: Any
  layers: tuple  # DenseLayer, in the order found
  dot_ids: tuple  # for each layer, its candidate number in the walk
  bias_ids: frozenset  # candidate numbers whose bias add is accepted
  out_shapes: tuple  # per layer, the per-example perturbed output shape


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr):
      return sub, ()
  return None


class Walker:
  """Evaluates the per-example jaxpr, classifying values as it goes.

  With ``plan=None`` it records candidate layers and parameter uses (run it
  abstractly). With a plan it records each accepted layer's input and adds
  ``perts[k]`` to layer ``k``'s output (after its bias when it has one).
  """

  def __init__(self, plan: Optional[Plan] = None, perts=None):
    self.plan, self.perts = plan, perts
    self.dots: list[dict] = []
    self.biases: dict[int, dict] = {}
    self.uses: dict[int, int] = {}
    self.acts: dict[int, Any] = {}
    self.out_shapes: dict[int, tuple] = {}

  def run(self, jaxpr, consts, args, infos):
    env = {}
    counts: dict = {}
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not isinstance(v, jcore.Literal):
          counts[v] = counts.get(v, 0) + 1
    for v in jaxpr.outvars:
      if not isinstance(v, jcore.Literal):
        counts[v] = counts.get(v, 0) + 1

    def read(v):
      return (v.val, _Info(CONST)) if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = (c, _Info(CONST))
    for v, a, i in zip(jaxpr.invars, args, infos):
      env[v] = (a, i)
    for eqn in jaxpr.eqns:
      vals, ins = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
      outs, outs_info = self._eqn(eqn, list(vals), list(ins))
      for v, o, i in zip(eqn.outvars, outs, outs_info):
        if i.dot is not None:
          i = dataclasses.replace(i, single_use=counts.get(v, 0) == 1)
        env[v] = (o, i)
    return zip(*[read(v) for v in jaxpr.outvars])

  def _use(self, ins):
    for i in ins:
      for leaf in i.leaves:
        self.uses[leaf] = self.uses.get(leaf, 0) + 1

  def _eqn(self, eqn, vals, ins):
    kinds = {i.kind for i in ins}
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if ACT not in kinds:
      return layers.bind(eqn, vals), [self._param_info(eqn, ins)] * n_out
    if PARAM in kinds and name in _INLINE and _sub_jaxpr(eqn) is not None:
      sub, sub_consts = _sub_jaxpr(eqn)
      outs, outs_info = self.run(sub, sub_consts, vals, ins)
      return list(outs), list(outs_info)
    self._use(ins)
    if name == "dot_general" and PARAM in kinds:
      return self._dot(eqn, vals, ins)
    if name in ("add", "add_any") and PARAM in kinds:
      return self._bias(eqn, vals, ins)
    return layers.bind(eqn, vals), [_Info(ACT)] * n_out

  def _param_info(self, eqn, ins):
    name = eqn.primitive.name
    leaves = frozenset().union(*(i.leaves for i in ins))
    if PARAM not in {i.kind for i in ins}:
      return _Info(CONST)
    (src,) = ins if len(ins) == 1 else (None,)
    if src is not None and src.chain is not None and (
        name in _KERNEL_OPS or name in _BIAS_OPS):
      flip = name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0)
      if name == "transpose" and not flip:
        self._use(ins)
        return _Info(PARAM, leaves)
      return _Info(PARAM, leaves, src.chain, src.transposed != flip,
                   bias_ok=src.bias_ok and name in _BIAS_OPS,
                   kernel_ok=src.kernel_ok and name in _KERNEL_OPS)
    self._use(ins)  # a computation on parameters: a use that is no layer
    return _Info(PARAM, leaves)

  def _dot(self, eqn, vals, ins):
    j = len(self.dots)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_pos = 0 if ins[0].kind == PARAM else 1
    w, x = ins[w_pos], ins[1 - w_pos]
    w_aval, x_aval = eqn.invars[w_pos].aval, eqn.invars[1 - w_pos].aval
    contract = (lc, rc)[w_pos]
    ok = (x.kind == ACT and w.chain is not None and w.kernel_ok
          and not lb and not rb
          and len(w_aval.shape) == 2 and len(contract) == 1)
    info = {"ok": ok}
    if ok:
      c = contract[0]
      d_in, d_out = w_aval.shape[c], w_aval.shape[1 - c]
      x_size = 1
      for s in x_aval.shape:
        x_size *= s
      # Stored [d_out, d_in] when contracted on axis 1, unless a transpose
      # in the chain already swapped it.
      info.update(ok=x_size == d_in, leaf=w.chain, d_in=d_in, d_out=d_out,
                  transposed=(c == 1) != w.transposed)
    self.dots.append(info)
    (out,) = layers.bind(eqn, vals)
    k = self._layer_number(j)
    if k is not None:
      self.acts[k] = jnp.reshape(vals[1 - w_pos], (-1,))
      if j not in self.plan.bias_ids:
        out = out + jnp.reshape(self.perts[k], out.shape).astype(out.dtype)
    return [out], [_Info(ACT, dot=j)]

  def _bias(self, eqn, vals, ins):
    (out,) = layers.bind(eqn, vals)
    pos = [i for i, info in enumerate(ins) if info.dot is not None]
    if len(pos) == 1 and ins[1 - pos[0]].kind == PARAM:
      y, b = ins[pos[0]], ins[1 - pos[0]]
      b_aval = eqn.invars[1 - pos[0]].aval
      y_aval = eqn.invars[pos[0]].aval
      self.biases[y.dot] = {
          "ok": y.single_use and b.chain is not None and b.bias_ok
                and b_aval.shape == y_aval.shape,
          "leaf": b.chain}
      k = self._layer_number(y.dot)
      if k is not None and y.dot in self.plan.bias_ids:
        out = out + jnp.reshape(self.perts[k], out.shape).astype(out.dtype)
    return [out], [_Info(ACT)]

  def _layer_number(self, j):
    if self.plan is None or j not in self.plan.dot_ids:
      return None
    return self.plan.dot_ids.index(j)


def leaf_infos(num_leaves):
  """Initial infos: each parameter leaf its own chain, then the input."""
  return [_Info(PARAM, frozenset([i]), i, bias_ok=True, kernel_ok=True)
          for i in range(num_leaves)] + [_Info(ACT)]


def analyse(apply_fn, params, example) -> Plan:
  """Traces ``apply_fn`` on one example and finds its dense layers.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``.
    params: the parameter pytree (arrays or shape structs).
    example: one example's input (array or ShapeDtypeStruct, no batch axis).

  Returns:
    A :class:`Plan`; ``plan.layers`` lists the dense layers.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in path_leaves]
  avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32)
           for _, x in path_leaves]

  def per_example(leaves, x):
    return apply_fn(jax.tree.unflatten(treedef, leaves), x[None])[0]

  x_aval = jax.ShapeDtypeStruct(example.shape, example.dtype)
  closed = jax.make_jaxpr(per_example)(avals, x_aval)
  walker = Walker()
  out_infos = []

  def walk(leaves, x):
    outs, infos = walker.run(closed.jaxpr, closed.consts, list(leaves) + [x],
                             leaf_infos(len(leaves)))
    out_infos.extend(infos)
    return list(outs)

  out_avals = jax.eval_shape(walk, avals, x_aval)
  if len(out_avals) != 1 or len(out_avals[0].shape) != 1:
    raise ValueError(
        "apply_fn(params, inputs) must return logits of shape [batch, "
        f"classes]; got per-example outputs {[o.shape for o in out_avals]}.")
  layers, dot_ids, bias_ids, shapes = [], [], set(), []
  for j, d in enumerate(walker.dots):
    if not d["ok"] or walker.uses.get(d["leaf"]) != 1:
      continue
    b = walker.biases.get(j, {"ok": False})
    has_bias = (b["ok"] and walker.uses.get(b["leaf"]) == 1
                and avals[b["leaf"]].shape == (d["d_out"],))
    layers.append(DenseLayer(
        paths[d["leaf"]], paths[b["leaf"]] if has_bias else None, d["leaf"],
        b["leaf"] if has_bias else None, d["transposed"], d["d_in"],
        d["d_out"]))
    dot_ids.append(j)
    if has_bias:
      bias_ids.add(j)
    shapes.append((d["d_out"],))
  return Plan(closed.jaxpr, closed.consts, treedef, tuple(layers),
              tuple(dot_ids), frozenset(bias_ids), tuple(shapes))
