"""examples/tunix_peft_ewc.py: EWC inside tunix's PeftTrainer (LM step).

Full fine-tuning and LoRA, the Fisher from the old data, the EWC state in
the trainer's optimiser, saved by tunix's checkpoint manager and restored:
a run resumed halfway ends where an uninterrupted one does.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix", reason="the LM extra (requirements-lm.txt)")
from flax import nnx  # noqa: E402

import ewc_jax  # noqa: E402
from examples import tunix_peft_ewc as example  # noqa: E402
from experiments.continual_lm import family  # noqa: E402
from tests.experiments.test_continual_lm import hf_config  # noqa: E402
from tests.experiments.test_continual_lm import write_checkpoint  # noqa: E402

SEQ, BATCH = 12, 4


def _ewc_state(opt_state):
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ewc_jax.EWCState))
           if isinstance(x, ewc_jax.EWCState)]
  assert len(found) == 1
  return found[0]


def _data():
  rng = np.random.default_rng(0)
  old = rng.integers(0, 300, (16, SEQ + 1)).astype(np.int32)
  new = ((rng.integers(0, 300, (32, 1)) + np.arange(SEQ + 1)) % 300).astype(
      np.int32)
  return old, new


def _pure(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(
      tree, nnx.State) else tree)


@pytest.mark.parametrize("lora", [False, True])
def test_peft_trainer_with_ewc_resumes_its_ewc_state(tmp_path, lora):
  ckpt = write_checkpoint(tmp_path / "model", hf_config())
  old, new = _data()

  def model():
    m, _, _ = family.load(ckpt)
    return family.with_lora(m, rank=2, alpha=4.0, seed=0) if lora else m

  start = model()
  # A copy: the trainer updates the model in place.
  params0 = jax.tree.map(lambda x: jnp.array(x, copy=True),
                         example.trained_params(start)[1])
  kw = dict(lam=50.0, learning_rate=1e-2, batch_size=BATCH, save_every=2)
  whole = example.fine_tune(start, old, new, steps=6, checkpoint_dir=str(
      tmp_path / "whole"), **kw)
  _, params, _ = example.trained_params(whole.model)
  state = _ewc_state(whole.optimizer.opt_state)
  assert int(state.num_tasks) == 1
  # The pull is on what the trainer trains: with LoRA, the adapters only.
  paths = {jax.tree_util.keystr(p) for p, _ in
           jax.tree.flatten_with_path(state.curvature)[0]}
  assert all(("lora" in p) == lora for p in paths) and paths
  penalty = float(ewc_jax.penalty(params, whole.optimizer.opt_state,
                                  lam=50.0))
  assert penalty > 0
  # The penalty is (lam / 2) sum F (theta - theta*)^2 at the start's
  # weights with the Fisher of the old data.
  fisher = ewc_jax.fisher_diagonal(
      family.make_apply_fn(*example.trained_params(model())[::2]), params0,
      (old[:, :-1], None, None), estimator="sampled",
      rng=jax.random.key(0), batch_size=16)
  np.testing.assert_allclose(
      penalty, ewc_jax.ewc_penalty(params, params0, fisher, 50.0), rtol=1e-4)
  if lora:  # the base weights did not move (LoRAParam is a Param)
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    chex.assert_trees_all_equal(_pure(nnx.state(whole.model, base)),
                                _pure(nnx.state(model(), base)))

  # Interrupted after 4 of the 6 steps, then resumed from tunix's
  # checkpoint: the EWC state comes back, is not consolidated again, and
  # the run ends where the uninterrupted one did.
  half = str(tmp_path / "half")
  first = example.fine_tune(model(), old, new, steps=4, checkpoint_dir=half,
                            **kw)
  assert first.train_steps == 4
  resumed = example.fine_tune(model(), old, new, steps=6,
                              checkpoint_dir=half, **kw)
  assert resumed.train_steps == 6
  restored = _ewc_state(resumed.optimizer.opt_state)
  assert int(restored.num_tasks) == 1  # restored, not consolidated again
  chex.assert_trees_all_close(_pure(restored.center), _pure(state.center))
  chex.assert_trees_all_close(_pure(restored.curvature),
                              _pure(state.curvature))
  _, got, _ = example.trained_params(resumed.model)
  chex.assert_trees_all_close(_pure(got), _pure(params), rtol=1e-4,
                              atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(_pure(got)), jax.tree.leaves(_pure(params0))))
  assert moved > 1e-4
