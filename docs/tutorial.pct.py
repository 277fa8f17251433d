# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial: three permuted tasks, with and without EWC
#
# A small MLP learns three tasks one after the other. Each task is the same
# classification problem seen through a different fixed permutation of the
# input pixels (the permuted-MNIST protocol of Kirkpatrick et al. 2017, on
# synthetic 8x8 images so that it runs anywhere in seconds). Trained plainly,
# the network forgets the first tasks as it learns the later ones; with
# `ewc_jax.ewc` in the optimiser and the diagonal Fisher folded in after
# each task, it keeps much of what it knew.
#
# This page is a [jupytext](https://jupytext.readthedocs.io) script,
# `docs/tutorial.pct.py`: run it with `python docs/tutorial.pct.py`, or open
# it as a notebook in Jupyter. The documentation build executes it, so every
# number below was computed when the page was built. It needs the library,
# Flax and matplotlib (`pip install ".[examples]"`).

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import ewc_jax

start = time.perf_counter()

# %% [markdown]
# ## Data: one problem, three permutations
#
# Ten classes, each a random 64-pixel prototype plus Gaussian noise. The
# noise is large enough that a class needs more than one pixel to be told
# apart, so the tasks compete for the network's weights. Task 0 sees the
# pixels in order; tasks 1 and 2 see them shuffled by fixed permutations.
# The same permutation applies to a task's training, validation and test
# examples.

# %%
NUM_TASKS, PIXELS, CLASSES = 3, 64, 10
rng = np.random.default_rng(0)
prototypes = rng.normal(size=(CLASSES, PIXELS)).astype(np.float32)


def sample(n, seed):
  r = np.random.default_rng(seed)
  labels = r.integers(0, CLASSES, n).astype(np.int32)
  noise = 2.0 * r.normal(size=(n, PIXELS)).astype(np.float32)
  return prototypes[labels] + noise, labels


splits = {"train": sample(2000, 1), "val": sample(500, 2),
          "test": sample(1000, 3)}
perms = [np.arange(PIXELS)] + [rng.permutation(PIXELS)
                               for _ in range(NUM_TASKS - 1)]
tasks = [{name: (x[:, p], y) for name, (x, y) in splits.items()}
         for p in perms]
print({name: x.shape for name, (x, _) in tasks[0].items()})

# %% [markdown]
# ## Model, loss and a jitted epoch
#
# The model is a Flax NNX module; the library only sees a params pytree and a
# pure `apply_fn(params, inputs) -> logits`. The optimiser state is an
# argument of the jitted function, so consolidating a task (which changes
# the state's values, not its structure) never retraces it.

# %%
class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(PIXELS, 256, rngs=rngs)
    self.out = nnx.Linear(256, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


graphdef, init_params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)


def apply_fn(params, x):
  return nnx.merge(graphdef, params)(x)


def loss_fn(params, x, y):
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, data):
  x, y = data
  return float(jnp.mean(jnp.argmax(apply_fn(params, x), axis=-1) == y))


BATCH, EPOCHS, LEARNING_RATE = 50, 10, 1e-3


def make_epoch(opt):
  """One epoch of mini-batch steps, as one jitted `lax.scan`."""

  @jax.jit
  def epoch(params, opt_state, x, y, key):
    order = jax.random.permutation(key, x.shape[0]).reshape(-1, BATCH)

    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state

  return epoch


# %% [markdown]
# ## Training on the tasks in sequence
#
# `train_sequence(lam)` trains the three tasks one after the other and
# returns the accuracy matrix `R`, `R[i, j]` being the accuracy on task `j`
# after training task `i`, on the validation and on the test examples.
# With `lam=None` the optimiser is plain Adam: fine-tuning. Otherwise
# `ewc_jax.ewc(lam)` goes first in the chain, and after each task
#
# 1. `ewc_jax.fisher_diagonal` estimates how much each weight mattered for
#    that task (the `exact` Fisher: every class weighted by the model's
#    `p(y|x)`), and
# 2. `ewc_jax.consolidate` folds the task into the EWC state: from then on
#    every update adds the pull `lam * F * (theta - theta*)` towards the
#    weights the task ended with.

# %%
def train_sequence(lam):
  if lam is None:
    opt = optax.adam(LEARNING_RATE)
  else:
    opt = optax.chain(ewc_jax.ewc(lam=lam), optax.adam(LEARNING_RATE))
  epoch = make_epoch(opt)
  params, opt_state = init_params, opt.init(init_params)
  key = jax.random.key(0)
  val = np.zeros((NUM_TASKS, NUM_TASKS))
  test = np.zeros((NUM_TASKS, NUM_TASKS))
  for i, task in enumerate(tasks):
    for _ in range(EPOCHS):
      key, sub = jax.random.split(key)
      params, opt_state = epoch(params, opt_state, *task["train"], sub)
    if lam is not None:
      fisher = ewc_jax.fisher_diagonal(apply_fn, params, task["train"],
                                       estimator="exact")
      opt_state = ewc_jax.consolidate(opt_state, params, fisher)
    val[i] = [accuracy(params, t["val"]) for t in tasks]
    test[i] = [accuracy(params, t["test"]) for t in tasks]
  return {"val": val, "test": test}


def average_accuracy(r):
  """ACC: the mean accuracy over all tasks after the last one."""
  return float(r[-1].mean())


def backward_transfer(r):
  """BWT: how much the old tasks lost (negative) since each was learnt."""
  return float(np.mean([r[-1, j] - r[j, j] for j in range(len(r) - 1)]))


def show(name, r):
  print(f"{name}: ACC {100 * average_accuracy(r):.1f}%, "
        f"BWT {100 * backward_transfer(r):+.1f} points")
  for i, row in enumerate(r):
    cells = "  ".join(f"{100 * a:5.1f}" for a in row[:i + 1])
    print(f"  after task {i}: {cells}")


# %% [markdown]
# ## Fine-tuning forgets

# %%
finetune = train_sequence(None)
show("fine-tuning", finetune["test"])

# %% [markdown]
# Each task is learnt to about the same accuracy when it is trained, and the
# earlier ones fall far behind by the end (the diagonal of `R` against its
# last row).
#
# ## EWC, with lambda chosen on validation
#
# Lambda sets how hard the old weights are held: too small and the network
# forgets, too large and it cannot learn the new task. It is chosen on the
# validation examples, never on the test ones (the values that work depend
# on the model, the data and the Fisher estimator: see
# [Which Fisher, which lambda](fisher_and_lambda.md)).

# %%
runs = {lam: train_sequence(lam) for lam in (3.0, 30.0, 300.0)}
for lam, r in runs.items():
  print(f"lam {lam:5g}: validation ACC {100 * average_accuracy(r['val']):.1f}%")
best = max(runs, key=lambda lam: average_accuracy(runs[lam]["val"]))
ewc_run = runs[best]
show(f"EWC, lam {best:g}", ewc_run["test"])

# %% [markdown]
# The pull keeps the first tasks much nearer to what they were just after
# training, at the price of some accuracy on the newest task: the weights it
# holds are no longer free to fit it.

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, r in (("fine-tuning", finetune["test"]),
                (f"EWC, lam {best:g}", ewc_run["test"])):
  seen = [100 * r[i, :i + 1].mean() for i in range(NUM_TASKS)]
  ax.plot(range(1, NUM_TASKS + 1), seen, marker="o", label=name)
ax.set_xlabel("tasks trained")
ax.set_ylabel("mean test accuracy on the tasks seen (%)")
ax.set_xticks(range(1, NUM_TASKS + 1))
ax.set_title("Three permuted tasks, one seed")
ax.legend()
fig.tight_layout()
plt.show()

# %%
acc_ft = average_accuracy(finetune["test"])
acc_ewc = average_accuracy(ewc_run["test"])
assert acc_ewc > acc_ft + 0.05, (acc_ft, acc_ewc)  # the tutorial's claim
print(f"ACC: fine-tuning {100 * acc_ft:.1f}%, EWC {100 * acc_ewc:.1f}%; "
      f"{time.perf_counter() - start:.0f} s in all")

# %% [markdown]
# ## Where to go from here
#
# - `ewc_jax.ewc(lam, mode="online", gamma=0.9)`: online EWC (one
#   quadratic, anchored at the latest weights, the old Fisher decayed by
#   `gamma`).
# - `optax.inject_hyperparams(ewc_jax.ewc, static_args=("mode",))(lam=...)`
#   makes `lam` a value in the optimiser state: schedule it, or change it
#   with `optax.tree_utils.tree_set` without recompiling the step.
# - `ewc_jax.penalty(params, opt_state, lam=...)` gives the pull's energy for
#   logging.
# - Other importances on the same `consolidate`: `ewc_jax.mas_importance`,
#   `ewc_jax.synaptic_intelligence`; Kronecker-factored curvature:
#   `ewc_jax.kfac_fisher` with `ewc_jax.kfac_ewc`. See the
#   [API reference](api.md).
