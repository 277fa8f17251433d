"""The Fisher of a sequence model against a Python loop over sequences.

The reference takes, sequence by sequence, ``jax.grad`` of the masked sum
of token log-likelihoods, with its labels drawn (``"sampled"``) from the
documented key of the sequence, ``fold_in(rng, index)``, and divides the
summed squares by the number of tokens the masks keep.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax

V, T, D = 5, 4, 6  # vocabulary, length, width


def _params(seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  def n(k, s, scale=0.5):
    return (scale * jax.random.normal(k, s)).astype(dtype)

  return {"emb": n(ks[0], (V, D)), "pos": n(ks[1], (T, D)),
          "qk": n(ks[2], (D, D)), "up": n(ks[3], (D, 2 * D)),
          "down": n(ks[4], (2 * D, D)), "scale": jnp.ones(D, dtype),
          "out_b": n(ks[5], (V,), 0.1)}


def lm(p, tokens):
  """A tiny causal transformer, logits [batch, T, V]: an embedding tied to
  the output, attention, a per-token MLP, a scale (RMSNorm-like)."""
  h = p["emb"][tokens] + p["pos"][: tokens.shape[1]]
  s = jnp.einsum("btd,de,bse->bts", h, p["qk"], h) / float(np.sqrt(D))
  causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
  h = h + jax.nn.softmax(jnp.where(causal, s, -1e9), -1) @ h
  h = h + jax.nn.gelu(h @ p["up"]) @ p["down"]
  h = h * p["scale"] / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
  return h @ p["emb"].T + p["out_b"]


def _data(n, seed=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  tokens = jax.random.randint(ks[0], (n, T), 0, V)
  labels = jnp.roll(tokens, -1, axis=1)
  lengths = jax.random.randint(ks[1], (n,), 0, T + 1)  # ragged, some empty
  mask = jnp.arange(T)[None] < lengths[:, None]
  labels = jnp.where(mask, labels, -100)  # ignored where masked out
  return tokens, labels, mask


def _seq_loglik(p, tokens, labels, mask):
  logp = jax.nn.log_softmax(lm(p, tokens[None])[0].astype(jnp.float32))
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], -1)
  return jnp.sum(jnp.where(mask, picked[:, 0], 0.0))


_grad = jax.jit(jax.grad(_seq_loglik))  # compiled once for every test


def reference(p, data, estimator, rng=None, num_samples=1, batch=None):
  """Sequence by sequence, as the docstring defines it."""
  tokens, labels, mask = (np.asarray(x) for x in data)
  grad = _grad
  total = jax.tree.map(lambda x: np.zeros(x.shape), p)
  add = lambda acc, g, w=1.0: jax.tree.map(  # noqa: E731
      lambda a, b: a + w * np.square(np.asarray(b, np.float64)), acc, g)
  if estimator == "batched":
    for s in range(0, len(tokens), batch):
      sl = slice(s, s + batch)
      count = float(mask[sl].sum())
      if count == 0:
        continue
      g = jax.grad(lambda q: sum(  # noqa: B023
          _seq_loglik(q, t, y, m) for t, y, m in zip(
              tokens[sl], labels[sl], mask[sl])) / count)(p)
      total = add(total, g, count)
    return jax.tree.map(lambda a: a / float(mask.sum()), total)
  for i in range(len(tokens)):
    logits = lm(p, tokens[i:i + 1])[0].astype(jnp.float32)
    if estimator == "empirical":
      draws, weights = [labels[i]], [1.0]
    elif estimator == "sampled":
      key = jax.random.fold_in(rng, i)
      ys = jax.random.categorical(key, logits, shape=(num_samples, T))
      draws, weights = list(np.asarray(ys)), [1 / num_samples] * num_samples
    else:  # exact: every class at every position, weight p
      probs = np.asarray(jax.nn.softmax(logits))
      for t in range(T):
        for c in range(V):
          one = np.zeros(T, bool)
          one[t] = mask[i, t]
          total = add(total, grad(p, tokens[i], np.full(T, c), one),
                      probs[t, c])
      continue
    for y, w in zip(draws, weights):
      total = add(total, grad(p, tokens[i], y, mask[i]), w)
  return jax.tree.map(lambda a: a / mask.sum(), total)


@pytest.mark.parametrize("estimator", ["sampled", "empirical", "exact"])
@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_sequence_fisher_equals_a_loop_over_sequences(estimator, path):
  params, data = _params(), _data(7)
  rng = jax.random.key(3)
  got = ewc_jax.fisher_diagonal(lm, params, data, estimator=estimator,
                                rng=rng, num_samples=2, batch_size=3,
                                path=path)
  want = reference(params, data, estimator, rng, num_samples=2)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-7)


def test_batched_squares_each_mini_batch_mean_token_gradient():
  params, data = _params(), _data(7)
  got = ewc_jax.fisher_diagonal(lm, params, data, estimator="batched",
                                batch_size=3)
  chex.assert_trees_all_close(got, reference(params, data, "batched",
                                             batch=3), rtol=2e-4, atol=1e-7)
  # A stream split elsewhere gives the same mini-batches of 3.
  x, y, m = data
  stream = [(x[:2], y[:2], m[:2]), (x[2:7], y[2:7], m[2:7])]
  chex.assert_trees_all_close(
      ewc_jax.fisher_diagonal(lm, params, stream, estimator="batched",
                              batch_size=3), got, rtol=1e-5)


def test_sampled_keys_do_not_depend_on_chunks_or_streams():
  params, data = _params(), _data(7)
  kw = dict(estimator="sampled", rng=jax.random.key(5))
  a = ewc_jax.fisher_diagonal(lm, params, data, batch_size=2, **kw)
  b = ewc_jax.fisher_diagonal(lm, params, data, batch_size=5, **kw)
  x, y, m = data
  c = ewc_jax.fisher_diagonal(
      lm, params, [(x[:4], None, m[:4]), (x[4:], None, m[4:])],
      batch_size=3, **kw)
  chex.assert_trees_all_close(a, b, rtol=1e-5)
  chex.assert_trees_all_close(a, c, rtol=1e-5)


def test_normalized_per_sequence_and_without_a_mask():
  params, (x, y, m) = _params(), _data(6)
  per_token = ewc_jax.fisher_diagonal(lm, params, (x, y, m),
                                      estimator="empirical")
  per_seq = ewc_jax.fisher_diagonal(lm, params, (x, y, m),
                                    estimator="empirical",
                                    normalize="sequences")
  ratio = float(m.sum()) / 6
  chex.assert_trees_all_close(per_seq, jax.tree.map(lambda f: f * ratio,
                                                    per_token), rtol=1e-5)
  full = jnp.ones_like(m)
  chex.assert_trees_all_close(
      ewc_jax.fisher_diagonal(lm, params, (x, jnp.maximum(y, 0)),
                              estimator="empirical"),
      ewc_jax.fisher_diagonal(lm, params, (x, jnp.maximum(y, 0), full),
                              estimator="empirical"), rtol=1e-5)


def test_bfloat16_params_accumulate_in_float32():
  params = _params(dtype=jnp.bfloat16)
  data = _data(6)
  kw = dict(estimator="sampled", rng=jax.random.key(1), batch_size=4)
  fast = ewc_jax.fisher_diagonal(lm, params, data, path="fast", **kw)
  slow = ewc_jax.fisher_diagonal(lm, params, data, path="vmap", **kw)
  assert all(f.dtype == jnp.float32 for f in jax.tree.leaves(fast))
  f32 = ewc_jax.fisher_diagonal(
      lm, jax.tree.map(lambda p: p.astype(jnp.float32), params), data, **kw)
  for a, b, c in zip(jax.tree.leaves(fast), jax.tree.leaves(slow),
                     jax.tree.leaves(f32)):
    scale = float(jnp.max(c)) + 1e-6
    assert float(jnp.max(jnp.abs(a - b))) < 0.1 * scale
    assert float(jnp.max(jnp.abs(a - c))) < 0.2 * scale


def test_bad_sequence_inputs_are_named():
  params, (x, y, m) = _params(), _data(5)
  with pytest.raises(ValueError, match=r"labels must be an array of class "
                                       r"indices \[N, 4\]"):
    ewc_jax.fisher_diagonal(lm, params, (x, y[:, :2], m),
                            estimator="empirical")
  with pytest.raises(ValueError, match=r"mask must be .*\[N, 4\]"):
    ewc_jax.fisher_diagonal(lm, params, (x, y, m[:, :3]),
                            estimator="empirical")
  bad = jnp.where(m, V, y)  # out of range where the mask keeps the label
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    ewc_jax.fisher_diagonal(lm, params, (x, bad, m), estimator="empirical")
  with pytest.raises(ValueError, match="keeps no token"):
    ewc_jax.fisher_diagonal(lm, params, (x, y, jnp.zeros_like(m)),
                            estimator="empirical")
  with pytest.raises(ValueError, match='normalize must be one of'):
    ewc_jax.fisher_diagonal(lm, params, (x, y, m), normalize="token")
  bigram = lambda p, t: p["e"][t]  # noqa: E731
  with pytest.raises(ValueError, match='Use estimator="sampled"'):
    ewc_jax.fisher_diagonal(bigram, {"e": jnp.zeros((200, 200))},
                            (jnp.zeros((2, 128), jnp.int32), None))


def test_tied_embeddings_with_integer_tokens_on_the_default_path():
  # The standard language-model pattern (issue 22): a gather with integer
  # indices and the same table as the output projection.
  emb = jax.random.normal(jax.random.key(0), (7, 4))
  f = lambda p, t: p["emb"][t].mean(1) @ p["emb"].T  # noqa: E731
  tok = jax.random.randint(jax.random.key(1), (9, 3), 0, 7)
  auto = ewc_jax.fisher_diagonal(f, {"emb": emb}, (tok, None))
  vmap = ewc_jax.fisher_diagonal(f, {"emb": emb}, (tok, None), path="vmap")
  chex.assert_trees_all_close(auto, vmap, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["cond", "switch"])
def test_vmapped_cond_and_switch_in_the_model(kind):
  w = jax.random.normal(jax.random.key(0), (4, 3))

  def one(p, x):
    if kind == "cond":
      return jax.lax.cond(x[0] > 0, lambda: x @ p["w"],
                          lambda: jnp.tanh(x) @ p["w"])
    return jax.lax.switch(jnp.int32(x[0] > 0) + jnp.int32(x[1] > 0),
                          [lambda: x @ p["w"], lambda: jnp.tanh(x) @ p["w"],
                           lambda: 2.0 * x @ p["w"]])

  f = lambda p, xs: jax.vmap(lambda x: one(p, x))(xs)  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (10, 4))
  auto = ewc_jax.fisher_diagonal(f, {"w": w}, (x, None))
  vmap = ewc_jax.fisher_diagonal(f, {"w": w}, (x, None), path="vmap")
  chex.assert_trees_all_close(auto, vmap, rtol=1e-5, atol=1e-9)
