"""Benchmark row: a language model's sequence Fisher against a training step.

Both in tokens per second, on the same decoder-only transformer (Flax NNX,
Qwen3-like: RMSNorm, causal attention, SwiGLU MLP, tied embedding), in one
process: ``ewc_jax.fisher_diagonal(..., estimator="sampled")`` over
``(tokens, None, mask)`` (one token drawn at every position, the Monte Carlo
true Fisher), and a jitted Adam step on the mean token loss of the same
batch. Only the ratio is a target (machines differ): the Fisher pass should
cost about one training step per token.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ewc_jax
from experiments.bench import common


class Block(nnx.Module):
  """Pre-norm attention and a SwiGLU MLP, as Llama/Qwen decoders."""

  def __init__(self, width, heads, rngs):
    self.heads = heads
    self.norm1 = nnx.RMSNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(width, rngs=rngs)
    self.gate = nnx.Linear(width, 2 * width, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, use_bias=False, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(
        b, t, 3 * self.heads, d // self.heads), 3, axis=2)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(y.reshape(b, t, d))
    h = self.norm2(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Decoder(nnx.Module):

  def __init__(self, vocab, width, layers, heads, rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(width, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))


def sequence_fisher_ratio(*, vocab=4096, width=256, layers=4, heads=4,
                          sequences=16, length=128, chunk=None, reps=3,
                          paths=("auto", "vmap")):
  """Tokens per second of the sampled sequence Fisher and of an Adam step.

  Returns:
    ``[{"what", "tokens_per_s", "ratio_to_train"}, ...]``: the train step
    first, then the Fisher on each path.
  """
  model = Decoder(vocab, width, layers, heads, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  apply_fn = lambda p, t: nnx.merge(graphdef, p)(t)  # noqa: E731
  tokens = jax.random.randint(jax.random.key(1), (sequences, length), 0,
                              vocab)
  labels = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones(tokens.shape, bool)
  n_tokens = sequences * length
  opt = optax.adam(1e-4)

  @jax.jit
  def step(p, s):
    def loss(p):
      logp = jax.nn.log_softmax(apply_fn(p, tokens).astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  train = common.best_time(lambda: step(params, state), reps)
  rows = [dict(what="train step (adam)", tokens_per_s=n_tokens / train,
               ratio_to_train=1.0)]
  for path in paths:
    def fisher(path=path):
      return ewc_jax.fisher_diagonal(
          apply_fn, params, (tokens, None, mask), estimator="sampled",
          rng=jax.random.key(2), batch_size=chunk, path=path)
    seconds = common.best_time(fisher, reps)
    rows.append(dict(what=f"sequence fisher sampled ({path})",
                     tokens_per_s=n_tokens / seconds,
                     ratio_to_train=train / seconds))
  params_count = sum(x.size for x in jax.tree.leaves(params))
  for r in rows:
    r.update(params=params_count, sequences=sequences, length=length)
  return rows
