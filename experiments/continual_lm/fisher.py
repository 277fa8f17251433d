r"""The sequence Fisher: a shim of the library's coming estimator rows.

:func:`fisher_diagonal` has exactly the signature that
``ewc_jax.fisher_diagonal`` takes for sequences (the sequence-Fisher
issue); when the library's lands, this module is deleted, its callers use
``ewc_jax.fisher_diagonal``, and its test stays as the experiment's check.

One example is one sequence ``x`` (``inputs[n]``, ``[T]``); its gradient is
that of the masked SUM of its token log-likelihoods,
``G_n = d/dtheta sum_t m_t log p(y_t | x_{<=t})``, and

.. math:: F = \frac{1}{Z} \sum_n G_n^2, \qquad Z = \sum_{n,t} m_{n,t}
   \ \text{(``normalize="tokens"``)} \ \text{or} \ N \
   \text{(``"sequences"``)}.

With ``"tokens"`` lambda means the same across sequence lengths when the
training loss is a mean over tokens. Estimators (the labels ``y``):
``"sampled"``, drawn from the model at every position given the data
prefix, ``num_samples`` per sequence (Monte Carlo, the true Fisher);
``"empirical"``, the data tokens; ``"exact"``, the expectation over the
vocabulary at every position (its cross terms between positions vanish in
expectation), for small vocabularies; ``"batched"``, not a Fisher: the
snippet's square of each mini-batch's mean gradient of the mean token loss,
averaged over batches weighted by their sizes (about ``F / (B T)``).

Per-sequence gradients come from ``ewc_jax.empirical_fisher`` (``jax.vmap``
of ``jax.grad`` in chunks, float32 accumulation) of the summed per-sequence
negative log-likelihood, rescaled to the normalisation; sampled tokens are
drawn first, one key per sequence, ``fold_in(rng, global index)``, so the
result does not depend on the chunking.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import ewc_jax

ESTIMATORS = ("sampled", "empirical", "exact", "batched")
NORMALIZE = ("tokens", "sequences")
_DEFAULT_BATCH = 16
_EXACT_MAX_VOCAB = 512


def _check(data, estimator, rng, num_samples, batch_size, num_examples,
           normalize):
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got "
                     f"{estimator!r}.")
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got "
                     f"{normalize!r}.")
  if not (isinstance(data, tuple) and len(data) == 3):
    raise ValueError("data must be (inputs [B, T], labels [B, T] or None, "
                     "mask [B, T] or None).")
  inputs, labels, mask = data
  inputs = np.asarray(inputs)
  if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
    raise ValueError(f"inputs must be int token ids [B, T], got "
                     f"{inputs.dtype} {inputs.shape}.")
  if labels is None and estimator in ("empirical", "batched"):
    raise ValueError(f"labels are None: estimator {estimator!r} needs the "
                     "data tokens.")
  for name, value in (("labels", labels), ("mask", mask)):
    if value is not None and np.shape(value) != inputs.shape:
      raise ValueError(f"{name} must have the shape of inputs "
                       f"{inputs.shape}, got {np.shape(value)}.")
  for name, value, none_ok in (("num_samples", num_samples, False),
                               ("batch_size", batch_size, True),
                               ("num_examples", num_examples, True)):
    if value is None and none_ok:
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if estimator == "sampled" and rng is None:
    raise ValueError("rng is None: the sampled Fisher draws tokens; pass "
                     "rng=jax.random.key(0).")
  if len(inputs) == 0:
    raise ValueError("inputs hold no sequences: the Fisher needs at least "
                     "one.")


def _nll_sum(apply_fn):
  """``loss(params, (tokens, labels, mask))``: one sequence's summed NLL."""

  def loss(params, example):
    tokens, labels, mask = example
    logits = apply_fn(params, tokens[None])[0].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(mask, picked, 0.0))

  return loss


def _nll_mean(apply_fn):
  """One sequence's mean token NLL (the snippet's loss per example)."""
  total = _nll_sum(apply_fn)

  def loss(params, example):
    count = jnp.maximum(jnp.sum(example[2]), 1)
    return total(params, example) / count

  return loss


def sample_tokens(apply_fn, params, inputs, rng, num_samples, batch_size):
  """``[S, N, T]`` tokens drawn from the model at every position.

  Sequence ``n``'s draw ``s`` uses ``fold_in(fold_in(rng, n), s)``.
  """
  n = len(inputs)

  @jax.jit
  def draw(params, chunk, index):
    logits = apply_fn(params, chunk).astype(jnp.float32)

    def one(row_logits, i):
      key = jax.random.fold_in(rng, i)
      return jax.vmap(lambda s: jax.random.categorical(
          jax.random.fold_in(key, s), row_logits))(jnp.arange(num_samples))

    return jax.vmap(one)(logits, index)

  out = []
  for start in range(0, n, batch_size):
    take = min(batch_size, n - start)
    chunk = np.zeros((batch_size, inputs.shape[1]), inputs.dtype)
    chunk[:take] = inputs[start:start + take]
    index = np.arange(start, start + batch_size, dtype=np.uint32)
    out.append(np.asarray(draw(params, chunk, index))[:take])
  return np.concatenate(out).astype(np.int32).transpose(1, 0, 2)


def _exact(apply_fn, params, inputs, mask):
  """``sum_n sum_t m_nt sum_v p_ntv (grad log p_ntv)^2`` (small V only)."""

  @jax.jit
  def per_sequence(params, tokens, m):
    def logp(p):
      return jax.nn.log_softmax(
          apply_fn(p, tokens[None])[0].astype(jnp.float32))

    probs = jax.lax.stop_gradient(jnp.exp(logp(params)))   # [T, V]
    t_len, vocab = probs.shape

    def one(tv):
      t, v = tv // vocab, tv % vocab
      g = jax.grad(lambda p: logp(p)[t, v])(params)
      w = probs[t, v] * m[t]
      return jax.tree.map(lambda x: w * jnp.square(x.astype(jnp.float32)),
                          g)

    terms = jax.lax.map(one, jnp.arange(t_len * vocab))
    return jax.tree.map(lambda x: jnp.sum(x, 0), terms)

  total = None
  for tokens, m in zip(inputs, mask, strict=True):
    f = per_sequence(params, tokens, m)
    total = f if total is None else jax.tree.map(jnp.add, total, f)
  return total


def fisher_diagonal(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    data: tuple,
    *,
    estimator: str = "sampled",
    rng: Optional[jax.Array] = None,
    num_samples: int = 1,
    batch_size: Optional[int] = None,
    num_examples: Optional[int] = None,
    path: str = "auto",
    sharding: Optional[jax.sharding.NamedSharding] = None,
    normalize: str = "tokens",
) -> Any:
  """The diagonal Fisher of a sequence model (see the module docstring).

  Args:
    apply_fn: ``apply_fn(params, inputs[B, T]) -> logits [B, T, V]``.
    params: the parameter pytree.
    data: ``(inputs, labels, mask)``: int ``[N, T]``; the target tokens
      ``[N, T]`` (may be None for "sampled" and "exact"); bool ``[N, T]``
      or None (every position).
    estimator: "sampled", "empirical", "exact" or "batched".
    rng: a PRNG key ("sampled").
    num_samples: token draws per sequence ("sampled").
    batch_size: sequences per chunk (per mini-batch for "batched").
    num_examples: use the first this many sequences; None: all.
    path: accepted for the library's signature; this shim always takes
      ``vmap`` gradients.
    sharding: passed to ``ewc_jax.empirical_fisher`` (data parallel).
    normalize: "tokens" or "sequences".

  Returns:
    A float32 tree shaped like ``params``.

  Raises:
    ValueError: a bad argument, named.
  """
  del path
  _check(data, estimator, rng, num_samples, batch_size, num_examples,
         normalize)
  inputs, labels, mask = data
  inputs = np.asarray(inputs)
  if num_examples is not None:
    inputs = inputs[:num_examples]
  n, t_len = inputs.shape
  labels = None if labels is None else np.asarray(labels)[:n].astype(
      np.int32)
  mask = (np.ones((n, t_len), bool) if mask is None
          else np.asarray(mask)[:n].astype(bool))
  chunk = batch_size or _DEFAULT_BATCH
  tokens = int(mask.sum())
  if tokens == 0:
    raise ValueError("mask selects no token: the Fisher needs at least one.")
  denominator = tokens if normalize == "tokens" else n
  if estimator == "batched":
    return ewc_jax.empirical_fisher(
        _nll_mean(apply_fn), params, (inputs, labels, mask),
        estimator="batched", batch_size=chunk, sharding=sharding)
  if estimator == "exact":
    vocab = jax.eval_shape(apply_fn, params, jnp.zeros((1, t_len),
                                                       jnp.int32)).shape[-1]
    if vocab > _EXACT_MAX_VOCAB:
      raise ValueError(f"estimator 'exact' sums over the vocabulary ({vocab} "
                       f"tokens; at most {_EXACT_MAX_VOCAB} here): use "
                       "'sampled'.")
    total = _exact(apply_fn, params, inputs, mask)
    return jax.tree.map(lambda x: x / denominator, total)
  if estimator == "sampled":
    drawn = sample_tokens(apply_fn, params, inputs, rng, num_samples, chunk)
    examples = (np.tile(inputs, (num_samples, 1)),
                drawn.reshape(num_samples * n, t_len),
                np.tile(mask, (num_samples, 1)))
  else:
    examples = (inputs, labels, mask)
  mean = ewc_jax.empirical_fisher(_nll_sum(apply_fn), params, examples,
                                  batch_size=chunk, sharding=sharding)
  # empirical_fisher averages over the examples it was given (N * S).
  return jax.tree.map(lambda x: x * (n / denominator), mean)
