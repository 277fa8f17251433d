"""KFAC's dense layers: the rule set that finds ``y = x W (+ b)``.

On the per-example jaxpr of ``walker.py``, a *dense layer* is a
``dot_general`` with no batch dimensions whose one operand is an activation
holding exactly ``d_in`` numbers (one token per example) and whose other
operand is a 2-D parameter leaf, at most cast or transposed, that is used
nowhere else. An optional bias is an ``add`` right after it (the dot's only
consumer) of a 1-D leaf of ``d_out`` entries, reshaped or broadcast without
reordering, and used nowhere else. Anything the rules cannot prove is such a
layer (a weight used twice, a dense layer applied per token, a layer inside
``scan``/``while``/``cond`` or a custom-derivative call, a convolution) is
left to the diagonal Fisher: never a wrong Kronecker block.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ewc_jax._src import tree as tree_lib
from ewc_jax._src.jaxpr import walker

_KERNEL_OPS = ("convert_element_type", "copy", "copy_p", "transpose")
_BIAS_OPS = ("convert_element_type", "copy", "copy_p", "reshape",
             "broadcast_in_dim", "squeeze", "expand_dims")


class DenseLayer(NamedTuple):
  """A dense layer ``y = x @ W (+ b)`` found in ``apply_fn`` (static data).

  Attributes:
    kernel: the pytree path of ``W`` (``jax.tree_util.keystr``, without the
      ``.value`` of an NNX variable).
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
class _Chain:
  """A parameter value that is one leaf, at most cast/viewed."""
  leaf: int
  transposed: bool = False
  bias_ok: bool = True  # reshaped only (no transpose)
  kernel_ok: bool = True  # cast or transposed only


@dataclasses.dataclass(frozen=True)
class _Dot:
  """The output of candidate dot number ``j``."""
  j: int
  single_use: bool


class Plan(NamedTuple):
  """What the compute pass needs: the traced jaxpr and accepted layers."""
  jaxpr: Any
  consts: Any
  treedef: Any
  layers: tuple  # DenseLayer, in the order found
  dot_ids: tuple  # for each layer, its candidate number in the walk
  bias_ids: frozenset  # candidate numbers whose bias add is accepted
  out_shapes: tuple  # per layer, the per-example perturbed output shape


class Rules:
  """Finds candidate layers (``plan=None``, run abstractly), or, with a
  plan, records each accepted layer's input and adds ``perts[k]`` to layer
  ``k``'s output (after its bias when it has one)."""

  def __init__(self, plan: Optional[Plan] = None, perts=None):
    self.plan, self.perts = plan, perts
    self.dots: list[dict] = []
    self.biases: dict[int, dict] = {}
    self.uses: dict[int, int] = {}
    self.acts: dict[int, Any] = {}

  def _use(self, tags):
    for t in tags:
      for leaf in t.leaves:
        self.uses[leaf] = self.uses.get(leaf, 0) + 1

  def param(self, eqn, vals, tags):
    outs = walker.bind(eqn, vals)
    return outs, [self._param_tag(eqn, tags)] * len(outs)

  def _param_tag(self, eqn, tags):
    name = eqn.primitive.name
    leaves = frozenset().union(*(t.leaves for t in tags))
    if walker.PARAM not in {t.kind for t in tags}:
      return walker.CONST_TAG
    (src,) = tags if len(tags) == 1 else (None,)
    chain = src.meta if src is not None else None
    if chain is not None and (name in _KERNEL_OPS or name in _BIAS_OPS):
      flip = name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0)
      if name == "transpose" and not flip:
        self._use(tags)
        return walker.Tag(walker.PARAM, leaves)
      return walker.Tag(walker.PARAM, leaves, _Chain(
          chain.leaf, chain.transposed != flip,
          bias_ok=chain.bias_ok and name in _BIAS_OPS,
          kernel_ok=chain.kernel_ok and name in _KERNEL_OPS))
    self._use(tags)  # a computation on parameters: a use that is no layer
    return walker.Tag(walker.PARAM, leaves)

  def act(self, eqn, vals, tags):
    del tags
    return walker.bind(eqn, vals)

  def layer(self, eqn, vals, tags, uses):
    self._use(tags)
    name = eqn.primitive.name
    if name == "dot_general":
      return self._dot(eqn, vals, tags, uses)
    if name in ("add", "add_any"):
      return self._bias(eqn, vals, tags)
    return walker.bind(eqn, vals), [walker.ACT_TAG] * len(eqn.outvars)

  def _dot(self, eqn, vals, tags, uses):
    j = len(self.dots)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_pos = 0 if tags[0].kind == walker.PARAM else 1
    w, x = tags[w_pos], tags[1 - w_pos]
    w_aval, x_aval = eqn.invars[w_pos].aval, eqn.invars[1 - w_pos].aval
    contract = (lc, rc)[w_pos]
    chain = w.meta
    ok = (x.kind == walker.ACT and isinstance(chain, _Chain)
          and chain.kernel_ok and not lb and not rb
          and len(w_aval.shape) == 2 and len(contract) == 1)
    info: dict = {"ok": ok}
    if ok:
      c = contract[0]
      d_in, d_out = w_aval.shape[c], w_aval.shape[1 - c]
      x_size = 1
      for s in x_aval.shape:
        x_size *= s
      # Stored [d_out, d_in] when contracted on axis 1, unless a transpose
      # in the chain already swapped it.
      info.update(ok=x_size == d_in, leaf=chain.leaf, d_in=d_in, d_out=d_out,
                  transposed=(c == 1) != chain.transposed)
    self.dots.append(info)
    (out,) = walker.bind(eqn, vals)
    k = self._layer_number(j)
    if k is not None:
      self.acts[k] = jnp.reshape(vals[1 - w_pos], (-1,))
      if j not in self.plan.bias_ids:
        out = out + jnp.reshape(self.perts[k], out.shape).astype(out.dtype)
    return [out], [walker.Tag(walker.ACT, meta=_Dot(j, uses[0] == 1))]

  def _bias(self, eqn, vals, tags):
    (out,) = walker.bind(eqn, vals)
    pos = [i for i, t in enumerate(tags) if isinstance(t.meta, _Dot)]
    if len(pos) == 1 and tags[1 - pos[0]].kind == walker.PARAM:
      y, b = tags[pos[0]], tags[1 - pos[0]]
      b_aval = eqn.invars[1 - pos[0]].aval
      y_aval = eqn.invars[pos[0]].aval
      chain = b.meta
      self.biases[y.meta.j] = {
          "ok": y.meta.single_use and isinstance(chain, _Chain)
                and chain.bias_ok and b_aval.shape == y_aval.shape,
          "leaf": chain.leaf if isinstance(chain, _Chain) else None}
      k = self._layer_number(y.meta.j)
      if k is not None and y.meta.j in self.plan.bias_ids:
        out = out + jnp.reshape(self.perts[k], out.shape).astype(out.dtype)
    return [out], [walker.ACT_TAG]

  def _layer_number(self, j):
    if self.plan is None or j not in self.plan.dot_ids:
      return None
    return self.plan.dot_ids.index(j)


def leaf_tags(num_leaves: int) -> list:
  """Initial tags: each parameter leaf its own chain, then the input."""
  return walker.leaf_tags(num_leaves, _Chain)


def forward(plan: Plan, leaves, x, perts):
  """``(output, per-layer inputs)`` of one example, ``perts`` added."""
  rules = Rules(plan, perts)
  (out,), _ = walker.run(rules, plan.jaxpr, plan.consts, list(leaves) + [x],
                         leaf_tags(len(leaves)))
  return out, [rules.acts[i] for i in range(len(plan.layers))]


def _analyse(apply_fn, params, example) -> Plan:
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_lib.path_str(p) for p, _ in path_leaves]
  f32_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), params)
  closed, treedef = walker.trace(apply_fn, f32_params, example)
  avals = jax.tree.leaves(f32_params)
  rules = Rules()
  out_tags = []

  def walk(leaves, x):
    outs, tags = walker.run(rules, closed.jaxpr, closed.consts,
                            list(leaves) + [x], leaf_tags(len(leaves)))
    out_tags.extend(tags)
    return outs

  out_avals = jax.eval_shape(walk, avals, jax.ShapeDtypeStruct(
      example.shape, example.dtype))
  if len(out_avals) != 1 or len(out_avals[0].shape) != 1:
    raise ValueError(
        "apply_fn(params, inputs) must return logits of shape [batch, "
        f"classes]; got per-example outputs {[o.shape for o in out_avals]}.")
  layers, dot_ids, bias_ids, shapes = [], [], set(), []
  for j, d in enumerate(rules.dots):
    if not d["ok"] or rules.uses.get(d["leaf"]) != 1:
      continue
    b = rules.biases.get(j, {"ok": False})
    has_bias = (b["ok"] and rules.uses.get(b["leaf"]) == 1
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


def plan_for(apply_fn, params, example) -> Plan:
  """The (cached) dense layers of ``apply_fn`` on examples like ``example``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``.
    params: the parameter pytree (arrays or shape structs).
    example: one example's input (array or ShapeDtypeStruct, no batch axis).
  """
  return walker.cached("kronecker", apply_fn, params, example,
                       lambda: _analyse(apply_fn, params, example))
