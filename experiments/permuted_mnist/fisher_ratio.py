"""How other codes' Fishers compare with the exact one, on a trained MLP.

Lambda values transfer between codes only through the ratio of their
Fishers. This trains the quick preset's MLP (2x256, Adam, 5 epochs) on the
first permuted task, then compares, on the task's training examples,

* ``exact``: ``sum_c p(c|x) (grad log p(c|x))^2`` (ours, van de Ven's
  current default);
* ``mammoth``: ``p(y|x) (grad log p(y|x))^2`` at the data label ``y`` only
  (Mammoth's ``ewc_on``);
* ``predicted``: ``(grad log p(c*|x))^2`` at the argmax label ``c*`` (van de
  Ven & Tolias's 2019 code);
* ``empirical``: ``(grad log p(y|x))^2`` at the data label.

It prints each one's total ``sum_i F_i`` relative to the exact total, and
the median of the elementwise ratio over parameters with a non-negligible
exact Fisher. Command (about a minute on a 2-core CPU):

  python -m experiments.permuted_mnist.fisher_ratio --examples 2000
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as data_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import models


def per_example_fishers(apply_fn, params, x, y):
  """The four estimators' Fishers (float32 trees), averaged over ``x``."""

  def logp(p, xi):
    return jax.nn.log_softmax(apply_fn(p, xi[None])[0])

  def one(xi, yi):
    probs = jnp.exp(logp(params, xi))
    # Gradients of every class's log-probability: [C, ...] per leaf.
    grads = jax.jacrev(logp)(params, xi)
    sq = jax.tree.map(jnp.square, grads)
    top = jnp.argmax(probs)

    def pick(c):
      return jax.tree.map(lambda s: s[c], sq)

    return {
        "exact": jax.tree.map(
            lambda s: jnp.tensordot(probs, s, axes=1), sq),
        "mammoth": jax.tree.map(lambda s: probs[yi] * s, pick(yi)),
        "predicted": pick(top),
        "empirical": pick(yi),
    }

  # Summed chunk by chunk: the per-example trees would not fit in memory.
  chunk = 50
  n = (len(y) // chunk) * chunk
  xs = x[:n].reshape(n // chunk, chunk, *x.shape[1:])
  ys = y[:n].reshape(n // chunk, chunk)

  def body(acc, batch):
    part = jax.vmap(one)(*batch)
    return jax.tree.map(lambda a, f: a + jnp.sum(f, 0), acc, part), None

  zeros = jax.eval_shape(one, x[0], y[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  total, _ = jax.lax.scan(body, zeros, (xs, ys))
  return jax.tree.map(lambda f: f / n, total)


def ratios(fishers) -> dict[str, tuple[float, float]]:
  """``{name: (total ratio, median elementwise ratio)}`` against exact."""
  flat = {k: np.concatenate([np.ravel(v) for v in jax.tree.leaves(f)])
          for k, f in fishers.items()}
  exact = flat["exact"]
  big = exact > 1e-3 * exact.max()
  return {k: (float(v.sum() / exact.sum()),
              float(np.median(v[big] / exact[big])))
          for k, v in flat.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=2000)
  parser.add_argument("--dataset", default="embedded")
  parser.add_argument("--data-dir", default=None)
  args = parser.parse_args()
  config = config_lib.get_config("quick").replace(
      dataset=args.dataset, data_dir=args.data_dir, num_tasks=1,
      methods=("finetune",), progress=False)
  dataset = data_lib.load_dataset(config.dataset, config.data_dir)
  stream = experiment.make_stream(config, dataset, 0)
  out = loop.run(config, stream, "finetune", [(0.0, 0)])
  acc = out.results[0].R[0, 0]
  print(f"trained MLP {config.hidden}: test accuracy {acc:.4f}")
  task = stream.tasks[0]
  graphdef = stream_graphdef(config)
  n = min(args.examples, len(task.train_y))
  fishers = jax.jit(per_example_fishers, static_argnums=0)(
      models.eval_apply_fn(graphdef), out.params,
      jnp.asarray(task.train_x[:n]), jnp.asarray(task.train_y[:n]))
  print(f"on {n} training examples: estimator, total / exact total, "
        "median elementwise ratio")
  for name, (total, median) in ratios(fishers).items():
    print(f"  {name:10s} {total:.3f}  {median:.3f}")


def stream_graphdef(config):
  """The graph definition of the runner's model for ``config``."""
  model = models.make_model(config.model, 10, seed=0, hidden=config.hidden)
  return models.split_model(model)[0]


if __name__ == "__main__":
  main()
