"""One walker over a per-example jaxpr, for every curvature's layer finder.

``apply_fn`` is traced on ONE example (so no operation can mix examples)
and evaluated equation by equation; each value is tagged by what it depends
on: the parameters only (``PARAM``, with the leaves it comes from), the
input (``ACT``), or neither (``CONST``). A *rule set* decides what the
equations mean (``diagonal.py``: the layers of the diagonal Fisher's fast
path; ``kronecker.py``: the dense layers of KFAC): the walker calls

* ``rules.param(eqn, vals, tags)`` for equations on parameters/constants,
* ``rules.act(eqn, vals, tags)`` for equations on activations only,
* ``rules.layer(eqn, vals, tags, uses)`` where parameters and the input
  meet (``uses``: how many equations read each output),

and inlines the calls that only structure a program (``jit``, ``remat``,
...) when they mix both. Everything else where both meet, control flow
(``scan``, ``while``, ``cond``) and custom-derivative calls
(``custom_jvp``/``custom_vjp``) included, reaches ``rules.layer`` WHOLE:
never inlined, so that their own derivative rules are honoured (a
straight-through estimator's gradient is its rule's, not its primal's).

Walking a jaxpr is cheap, but tracing and analysing a model is not: plans
are cached per ``(apply_fn, params' structure, shapes and dtypes, example
shape and dtype)`` in one bounded cache, :func:`cached`.
"""

import collections
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

INLINE = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
CONST, PARAM, ACT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Tag:
  """What a value depends on.

  Attributes:
    kind: ``CONST``, ``PARAM`` or ``ACT``.
    leaves: the parameter leaves (indices) a ``PARAM`` value comes from.
    meta: a rule set's own facts about the value (hashable).
  """
  kind: int
  leaves: frozenset = frozenset()
  meta: Any = None


ACT_TAG = Tag(ACT)
CONST_TAG = Tag(CONST)


def sub_jaxpr(eqn) -> Optional[tuple]:
  """``(jaxpr, consts)`` of a call equation, or ``None``."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr):
      return sub, ()
  return None


def to_f32(x: Any) -> Any:
  """Floating values as float32; others (ints, bools, keys) unchanged."""
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.asarray(x, jnp.float32)
  return x


def bind(eqn, invals, f32: bool = False) -> list:
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


def _use_counts(jaxpr) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for eqn in jaxpr.eqns:
    counts.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  counts.update(v for v in jaxpr.outvars if not isinstance(v, jcore.Literal))
  return counts


def run(rules, jaxpr, consts, args, tags, f32: bool = False):
  """Evaluates ``jaxpr`` on ``args`` (tagged ``tags``) under ``rules``.

  Returns:
    ``(outs, out_tags)``, lists aligned with ``jaxpr.outvars``.
  """
  env: dict = {}
  uses = _use_counts(jaxpr)
  cast = to_f32 if f32 else (lambda x: x)

  def read(v):
    if isinstance(v, jcore.Literal):
      return cast(v.val), CONST_TAG
    return env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = (cast(c), CONST_TAG)
  for v, a, t in zip(jaxpr.invars, args, tags):
    env[v] = (a, t)
  for eqn in jaxpr.eqns:
    vals, ins = (list(z) for z in zip(*map(read, eqn.invars))) if (
        eqn.invars) else ([], [])
    kinds = {t.kind for t in ins}
    if ACT not in kinds:
      outs, out_tags = rules.param(eqn, vals, ins)
    elif PARAM not in kinds:
      outs = rules.act(eqn, vals, ins)
      out_tags = [ACT_TAG] * len(eqn.outvars)
    elif eqn.primitive.name in INLINE and (found := sub_jaxpr(eqn)):
      outs, out_tags = run(rules, found[0], found[1], vals, ins, f32)
    else:
      outs, out_tags = rules.layer(eqn, vals, ins,
                                   [uses[v] for v in eqn.outvars])
    for v, o, t in zip(eqn.outvars, outs, out_tags):
      env[v] = (o, t)
  if not jaxpr.outvars:
    return [], []
  outs, out_tags = zip(*[read(v) for v in jaxpr.outvars])
  return list(outs), list(out_tags)


def leaf_tags(num_leaves: int, meta: Callable[[int], Any] = lambda i: None
              ) -> list:
  """Initial tags: each parameter leaf its own, then the input's."""
  return [Tag(PARAM, frozenset([i]), meta(i)) for i in range(num_leaves)] + [
      ACT_TAG]


def trace(apply_fn, params, example):
  """``(closed jaxpr, treedef)`` of ``apply_fn`` on one example.

  The jaxpr takes ``(leaves, x)``: the parameter leaves (as float32
  abstract values when ``params`` are) and one example without its batch
  axis; it returns the example's model output.
  """
  leaves, treedef = jax.tree.flatten(params)

  def per_example(leaves, x):
    return apply_fn(jax.tree.unflatten(treedef, leaves), x[None])[0]

  closed = jax.make_jaxpr(per_example)(
      [jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p))
       for p in leaves],
      jax.ShapeDtypeStruct(example.shape, example.dtype))
  return closed, treedef


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64


def signature(params, example) -> tuple:
  """The shapes and dtypes a trace depends on (a cache key's part)."""
  return (jax.tree.structure(params),
          tuple((jnp.shape(p), jnp.result_type(p))
                for p in jax.tree.leaves(params)),
          tuple((jnp.shape(x), jnp.result_type(x))
                for x in jax.tree.leaves(example)))


def cached(kind: str, apply_fn, params, example, build: Callable) -> Any:
  """``build()``, cached per ``(kind, apply_fn, signature)``.

  The least recently used plans are dropped past a bound, so that a long
  session with many models keeps the recent ones alive, not all.
  """
  key = (kind, apply_fn, signature(params, example))
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = build()
  _CACHE[key] = value
  if len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return value
