"""A small byte-level transformer language model in Flax NNX.

Decoder-only, pre-layer-norm, causal multi-head self-attention, learned
position embeddings, 256 byte tokens (no tokenizer). The model holds only
``nnx.Param`` state (no dropout), so ``nnx.split(model, nnx.Param)`` gives
the whole model as ``(graphdef, params)`` and :func:`make_loss_fn` the
per-example loss that ``ewc_jax.continual.continual_fine_tune`` and the
experiment's trainer expect.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

VOCAB_SIZE = 256  # bytes


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention in which position t sees positions <= t."""

  def __init__(self, d_model: int, num_heads: int, *, dtype: Any,
               rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(
          f"d_model ({d_model}) must be a multiple of num_heads "
          f"({num_heads}).")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(d_model, 3 * d_model, dtype=dtype,
                          param_dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, dtype=dtype, param_dtype=dtype,
                          rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * h, d // h), 3, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), bool))
    # Softmax in float32: bfloat16 logits lose the small attention weights.
    weights = jax.nn.softmax(
        jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
    y = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)
    return self.out(y.reshape(b, t, d))


class Block(nnx.Module):
  """``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, d_model: int, num_heads: int, *, dtype: Any,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=dtype,
                             rngs=rngs)
    self.attn = CausalSelfAttention(d_model, num_heads, dtype=dtype,
                                    rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=dtype,
                             rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, dtype=dtype,
                         param_dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, dtype=dtype,
                           param_dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """A byte-level decoder-only transformer.

  Args:
    max_len: the longest input sequence (size of the position table).
    d_model: the width of the residual stream.
    num_heads: attention heads per layer.
    num_layers: transformer blocks.
    dtype: the dtype of the parameters and of the computation (float32 or
      bfloat16); attention softmax and logits are float32.
    rngs: ``nnx.Rngs`` for the initialisation.
  """

  def __init__(self, *, max_len: int, d_model: int = 64, num_heads: int = 4,
               num_layers: int = 2, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(VOCAB_SIZE, d_model, dtype=dtype,
                           param_dtype=dtype, embedding_init=init, rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (max_len, d_model), dtype))
    self.blocks = nnx.List([
        Block(d_model, num_heads, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=dtype,
                              rngs=rngs)
    self.head = nnx.Linear(d_model, VOCAB_SIZE, dtype=dtype,
                           param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, T, 256]`` (float32) of the byte after each position."""
    t = tokens.shape[1]
    if t > self.pos.shape[0]:
      raise ValueError(
          f"tokens has length {t}, longer than max_len {self.pos.shape[0]}.")
    x = self.embed(tokens) + self.pos[:t]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x)).astype(jnp.float32)


def make_model(*, seq_len: int, d_model: int, num_heads: int,
               num_layers: int, dtype: Any = jnp.float32,
               seed: int = 0) -> tuple[nnx.GraphDef, Any]:
  """A :class:`TransformerLM` split into ``(graphdef, params)``."""
  model = TransformerLM(max_len=seq_len, d_model=d_model,
                        num_heads=num_heads, num_layers=num_layers,
                        dtype=dtype, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"TransformerLM should hold only Params; found {rest}.")
  return graphdef, params


def sequence_loss(graphdef: nnx.GraphDef, params: Any,
                  tokens: jax.Array) -> jax.Array:
  """One sequence's mean next-byte cross-entropy (nats per byte).

  Args:
    graphdef: from :func:`make_model`.
    params: the parameters.
    tokens: int ``[T + 1]`` byte ids; the model reads the first ``T`` and
      predicts the last ``T``.

  Returns:
    A float32 scalar.
  """
  logits = nnx.merge(graphdef, params)(tokens[None, :-1])[0]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[1:]).mean()


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Any], jax.Array]:
  """``loss_fn(params, tokens)``: :func:`sequence_loss` for one model.

  Make it once and reuse it: jitted functions that take it as a static
  argument are compiled once per function object.
  """

  def loss_fn(params, tokens):
    return sequence_loss(graphdef, params, tokens)

  return loss_fn


def num_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
