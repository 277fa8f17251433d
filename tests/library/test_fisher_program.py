"""The array Fisher pass as one program, its plans, and hostile inputs."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ewc_jax
from ewc_jax._src import chunking
from ewc_jax._src import pass_driver
from ewc_jax._src.jaxpr import diagonal
from tests.library import models
from tests.library.test_fisher import closed_form
from tests.library.test_fisher import linear_softmax
from tests.library.test_fisher import loop_reference


def _mlp():
  return models.nnx_apply(models.NNXMLP([6, 8, 3], nnx.Rngs(0)))


def _data(n, d=6, c=3, seed=1):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, c)


class _Counts:
  """Backend compilations, counted through JAX's public monitoring events."""

  def __init__(self):
    self.events = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: self.events.update([name]))

  def compiles(self):
    return self.events["/jax/core/compile/backend_compile_duration"]


COUNTS = _Counts()


def test_array_pass_compiles_once_and_runs_as_one_program(monkeypatch):
  calls = collections.Counter()
  apply_fn, params = _mlp()

  def counted_apply(p, x):
    calls["apply_fn"] += 1  # Python-level: only while tracing
    return apply_fn(p, x)

  for name in ("over_arrays", "add_chunk"):
    original = getattr(pass_driver, name)
    monkeypatch.setattr(pass_driver, name,
                        lambda *a, _o=original, _n=name, **k: (
                            calls.update([_n]), _o(*a, **k))[1])
  kw = dict(estimator="exact", batch_size=8, path="fast")
  ewc_jax.fisher_diagonal(counted_apply, params, _data(16), **kw)  # warm up
  for n in (8 * 2 + 3, 8 * 40 + 3):  # 3 chunks, then 41 (the last padded)
    data = _data(n)
    calls.clear()
    before = COUNTS.compiles()
    ewc_jax.fisher_diagonal(counted_apply, params, data, **kw)
    # One new program for the new data shape, whatever the number of chunks;
    # apply_fn traced a fixed number of times; no per-chunk step dispatched.
    assert COUNTS.compiles() - before == 1
    assert calls["over_arrays"] == 1 and calls["add_chunk"] == 0
    traces = calls["apply_fn"]
    if n == 8 * 2 + 3:
      traces_first = traces
  assert traces == traces_first
  calls.clear()
  before = COUNTS.compiles()
  ewc_jax.fisher_diagonal(counted_apply, params, data, **kw)
  assert COUNTS.compiles() == before and calls["over_arrays"] == 1
  # A stream dispatches one step per chunk.
  x, y = _data(8 * 5)
  ewc_jax.fisher_diagonal(counted_apply, params, [(x, y)], **kw)
  assert calls["add_chunk"] == 5


@pytest.mark.parametrize("path", ["fast", "vmap"])
@pytest.mark.parametrize("estimator",
                         ["exact", "sampled", "empirical", "predicted",
                          "batched"])
def test_array_program_equals_chunked_stream(path, estimator):
  apply_fn, params = _mlp()
  x, y = _data(45)
  kw = dict(estimator=estimator, batch_size=8, path=path,
            rng=jax.random.key(3), num_samples=2)
  arrays = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), **kw)
  stream = ewc_jax.fisher_diagonal(
      apply_fn, params, [(x[:16], y[:16]), (x[16:], y[16:])], **kw)
  chex.assert_trees_all_close(arrays, stream, rtol=2e-6, atol=1e-9)
  capped = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), num_examples=21,
                                   **kw)
  stream = ewc_jax.fisher_diagonal(apply_fn, params, [(x[:21], y[:21])], **kw)
  chex.assert_trees_all_close(capped, stream, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_predicted_matches_closed_form(path):
  apply_fn, params, x, _ = linear_softmax()
  p = jax.nn.softmax(apply_fn(params, x))
  d2 = jnp.square(jax.nn.one_hot(jnp.argmax(p, 1), p.shape[1]) - p)
  want = {"w": (x ** 2).T @ d2 / x.shape[0], "b": d2.mean(0)}
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, None), path=path,
                                estimator="predicted", batch_size=16)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  # It is not the empirical Fisher at the data labels.
  assert not np.allclose(got["w"], closed_form(params, x, _)["w"])


@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_padding_never_feeds_a_zero_row(path):
  # x / ||x|| is undefined at 0: zero padding gave a false non-finite error.
  params = {"w": jax.random.normal(jax.random.key(0), (5, 3))}

  def apply_fn(p, x):
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)) @ p["w"]

  x, y = _data(10, d=5)
  for data in ((x, y), [(x, y)]):
    got = ewc_jax.fisher_diagonal(apply_fn, params, data, batch_size=4,
                                  path=path)
    want = closed_form({"w": params["w"], "b": jnp.zeros(3)},
                       x / jnp.linalg.norm(x, axis=-1, keepdims=True))
    chex.assert_trees_all_close(got["w"], want["w"], rtol=1e-5)


def _straight_through(kind):
  """round(x @ w) with the straight-through (identity) derivative."""
  if kind == "vjp":
    @jax.custom_vjp
    def quant(w, x):
      return jnp.round(x @ w)
    quant.defvjp(lambda w, x: (jnp.round(x @ w), (w, x)),
                 lambda res, g: (res[1].T @ g, g @ res[0].T))
  else:
    @jax.custom_jvp
    def quant(w, x):
      return jnp.round(x @ w)

    @quant.defjvp
    def _(primals, tangents):
      (w, x), (dw, dx) = primals, tangents
      return jnp.round(x @ w), x @ dw + dx @ w
  return lambda p, x: quant(p["w"], x)


@pytest.mark.parametrize("kind", ["vjp", "jvp"])
def test_custom_derivative_mixing_params_and_inputs_is_honoured(kind):
  apply_fn = _straight_through(kind)
  params = {"w": 2.0 * jax.random.normal(jax.random.key(0), (5, 3))}
  x, y = _data(12, d=5)
  # The layer-wise path takes the custom call whole, as a layer whose
  # per-example gradient comes from its own rule (never its primal's).
  assert diagonal.unsupported_reason(apply_fn, params, x) is None
  want = loop_reference(apply_fn, params, x, y, "exact")
  assert float(jnp.sum(want["w"])) > 0.1
  for path in ("fast", "vmap"):
    got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), batch_size=4,
                                  path=path)
    chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_integer_params_are_refused_by_path():
  apply_fn, params, x, y = linear_softmax()
  params = {**params, "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(ValueError, match=r"params\['step'\] has dtype int32"):
    ewc_jax.fisher_diagonal(lambda p, xs: apply_fn(p, xs), params, (x, y))
  with pytest.raises(ValueError, match=r"params\['step'\]"):
    ewc_jax.empirical_fisher(lambda p, z: jnp.sum(p["w"]), params, (x, y))


@pytest.mark.parametrize("stream", [False, True])
def test_nonfinite_params_are_blamed_on_the_param_leaf(stream):
  apply_fn, params, x, y = linear_softmax()
  params = {**params, "w": params["w"].at[0, 0].set(jnp.nan)}
  data = [(x, y)] if stream else (x, y)
  with pytest.raises(ValueError) as err:
    ewc_jax.fisher_diagonal(apply_fn, params, data, batch_size=16)
  assert "params['w'] has 1 non-finite" in str(err.value)
  assert "the Fisher" not in str(err.value).split("params['w']")[0]


def test_nonfinite_data_are_blamed_on_the_data():
  apply_fn, params, x, y = linear_softmax()
  with pytest.raises(ValueError, match="data inputs has 1 non-finite"):
    ewc_jax.fisher_diagonal(apply_fn, params, (x.at[3, 1].set(jnp.inf), y))


@pytest.mark.parametrize("stream", [False, True])
def test_label_column_is_refused_clearly(stream):
  apply_fn, params, x, y = linear_softmax()
  data = [(x, y[:, None])] if stream else (x, y[:, None])
  with pytest.raises(ValueError, match=r"1-D .*reshape\(-1\)"):
    ewc_jax.fisher_diagonal(apply_fn, params, data, estimator="empirical")


def test_label_range_is_checked_on_device_and_reported():
  apply_fn, params, x, y = linear_softmax()
  with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 7\]"):
    ewc_jax.fisher_diagonal(apply_fn, params, (x, y.at[5].set(7)),
                            estimator="empirical", batch_size=8)


def test_batched_ragged_last_batch_weighted_by_size():
  # N = 257, B = 256: the old estimator gave the 1-example batch the weight
  # of a full one (a 37% higher sum here).
  apply_fn, params, x, y = linear_softmax(n=257)

  def mean_nll(p, xs, ys):
    logp = jax.nn.log_softmax(apply_fn(p, xs))
    return -jnp.mean(jnp.take_along_axis(logp, ys[:, None], 1))

  g1 = jax.grad(mean_nll)(params, x[:256], y[:256])
  g2 = jax.grad(mean_nll)(params, x[256:], y[256:])
  want = jax.tree.map(lambda a, b: (256 * a ** 2 + b ** 2) / 257, g1, g2)
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y),
                                estimator="batched")
  chex.assert_trees_all_close(got, want, rtol=1e-5)

  def nll(p, ex):
    return -jax.nn.log_softmax(apply_fn(p, ex[0][None])[0])[ex[1]]

  chex.assert_trees_all_close(
      ewc_jax.empirical_fisher(nll, params, (x, y), estimator="batched",
                               batch_size=256), want, rtol=1e-5)


def test_numpy_integer_batch_size_is_accepted():
  apply_fn, params, x, y = linear_softmax()
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y),
                                batch_size=np.int64(8))
  chex.assert_trees_all_close(got, closed_form(params, x), rtol=1e-5)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    ewc_jax.fisher_diagonal(apply_fn, params, (x, y), batch_size=8.0)


def test_plans_per_backend():
  cpu = chunking.plan_chunks(None, 60000, example_bytes=20_000, backend="cpu")
  assert (cpu.chunk, cpu.sub_chunk, cpu.group, cpu.unroll) == (
      256, 64, 8, True)
  gpu = chunking.plan_chunks(None, 60000, example_bytes=20_000,
                             backend="gpu")
  # Thousands of examples per chunk, no sub-chunks, little padding.
  assert gpu.chunk >= 4096 and gpu.sub_chunk == gpu.chunk
  assert -(-60000 // gpu.chunk) * gpu.chunk - 60000 < 8 * -(-60000 //
                                                            gpu.chunk)
  big = chunking.plan_chunks(None, 60000, example_bytes=2**27, backend="tpu")
  assert big.chunk == chunking.ACCEL_MIN_CHUNK  # the memory budget bounds it
  small = chunking.plan_chunks(None, 10, example_bytes=4, backend="gpu")
  assert small.chunk == 16
  explicit = chunking.plan_chunks(np.int64(100), 60000, example_bytes=4,
                                  backend="gpu")
  assert explicit.chunk == 100


def test_default_batch_size_runs_on_any_backend_plan():
  apply_fn, params = _mlp()
  x, y = _data(50)
  want = loop_reference(apply_fn, params, x[:50], y, "exact")
  chex.assert_trees_all_close(
      ewc_jax.fisher_diagonal(apply_fn, params, (x, y)), want, rtol=1e-5,
      atol=1e-8)


@pytest.mark.parametrize("path", ["fast", "vmap"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_accelerator_plan_gives_the_same_fisher(monkeypatch, path, estimator):
  # The GPU/TPU plan (whole-chunk sub-chunks, reductions instead of unrolled
  # sums), run here on CPU by pretending the backend is a GPU.
  monkeypatch.setattr(chunking.jax, "default_backend", lambda: "gpu")
  apply_fn, params = _mlp()
  x, y = _data(37)
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, y), path=path,
                                estimator=estimator)
  want = loop_reference(apply_fn, params, x, y, estimator)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend,batch_size", [("gpu", None), ("cpu", 2)])
def test_convolution_gradients_in_either_order(monkeypatch, backend,
                                               batch_size):
  # A convolution's per-example gradients: on CPU one example at a time with
  # its K cotangents at once (checked in test_fast_fisher), unless K (3
  # classes) exceeds the examples of a sub-chunk (2 here); on an accelerator
  # all examples at once, one cotangent at a time.
  monkeypatch.setattr(chunking.jax, "default_backend", lambda: backend)
  apply_fn, params = models.nnx_apply(models.NNXCNN(nnx.Rngs(0), classes=3))
  x = jax.random.normal(jax.random.key(1), (6, 8, 8))
  got = ewc_jax.fisher_diagonal(apply_fn, params, (x, None), path="fast",
                                batch_size=batch_size)

  def exact(xi):  # sum_c p_c (d log p_c / d theta)^2 from the full Jacobian
    log_p = lambda p: jax.nn.log_softmax(apply_fn(p, xi[None])[0])  # noqa
    probs = jnp.exp(log_p(params))
    return jax.tree.map(lambda j: jnp.einsum("c,c...->...", probs, j ** 2),
                        jax.jacrev(log_p)(params))

  want = jax.tree.map(lambda t: t.mean(0), jax.jit(jax.vmap(exact))(x))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_fewer_examples_than_one_chunk():
  apply_fn, params, x, y = linear_softmax()
  for n in (1, 3):
    got = ewc_jax.fisher_diagonal(apply_fn, params, (x[:n], y[:n]))
    chex.assert_trees_all_close(got, closed_form(params, x[:n]), rtol=1e-5)
