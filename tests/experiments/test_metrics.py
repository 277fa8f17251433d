"""Tests for experiments.metrics against hand-computed values."""

import numpy as np
import pytest

from experiments.common import metrics

# R[i, j]: accuracy on task j after training task i. Task 0 improves after
# task 1 (0.90 -> 0.95), so forgetting (from the best value) differs from -BWT.
R = [
  [0.90, 0.10, 0.20],
  [0.95, 0.80, 0.30],
  [0.60, 0.50, 0.90],
]
B = [0.10, 0.20, 0.10]


def test_acc_by_hand():
  # (0.6 + 0.5 + 0.9) / 3
  assert metrics.acc(R) == pytest.approx(2.0 / 3.0)


def test_bwt_by_hand():
  # ((0.6 - 0.9) + (0.5 - 0.8)) / 2
  assert metrics.bwt(R) == pytest.approx(-0.30)


def test_fwt_by_hand():
  # ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.1 - 0.2) + (0.3 - 0.1)) / 2
  assert metrics.fwt(R, B) == pytest.approx(0.05)


def test_forgetting_by_hand():
  # task 0: max(0.90, 0.95) - 0.60 = 0.35; task 1: max(0.10, 0.80) - 0.50 = 0.30
  assert metrics.forgetting(R) == pytest.approx(0.325)


def test_average_accuracy_curve_by_hand():
  # [0.9, (0.95 + 0.8) / 2, (0.6 + 0.5 + 0.9) / 3]
  np.testing.assert_allclose(
    metrics.average_accuracy_curve(R), [0.90, 0.875, 2.0 / 3.0]
  )


def test_summarize():
  assert metrics.summarize(R) == pytest.approx(
    {"acc": 2.0 / 3.0, "bwt": -0.30, "forgetting": 0.325}
  )
  assert metrics.summarize(np.array(R), B)["fwt"] == pytest.approx(0.05)


def test_perfect_memory_has_no_forgetting():
  # Every task learnt to 1.0 and kept: nothing forgotten or transferred back.
  R_keep = [[1.0, 0.0], [1.0, 1.0]]
  assert metrics.bwt(R_keep) == 0.0
  assert metrics.forgetting(R_keep) == 0.0
  assert metrics.acc(R_keep) == 1.0


def test_single_task_has_no_transfer_metrics():
  # BWT, FWT and forgetting need a second task: undefined, not 0 (issue 14);
  # the single functions keep returning 0.0.
  assert metrics.summarize([[0.7]], [0.1]) == {
    "acc": 0.7,
    "bwt": None,
    "forgetting": None,
    "fwt": None,
  }
  assert metrics.bwt([[0.7]]) == 0.0
  np.testing.assert_allclose(metrics.average_accuracy_curve([[0.7]]), [0.7])


@pytest.mark.parametrize(
  "bad", [[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [0.1, 0.2], np.zeros((0, 0))]
)
def test_non_square_raises(bad):
  with pytest.raises(ValueError, match=r"square T x T matrix.*got shape"):
    metrics.acc(bad)


def test_b_of_wrong_length_raises():
  with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
    metrics.fwt(R, [0.1, 0.2])


def test_phase_timer_splits_out_compilation_and_nested_phases():
  import time  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments.common import timing  # noqa: PLC0415

  timer = timing.PhaseTimer()
  with timer.phase("train"):
    time.sleep(0.05)
    with timer.phase("checkpoint"):
      time.sleep(0.05)
    # A function never compiled before: its tracing and compilation go to
    # "compile", not "train".
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.5)(
        jnp.arange(7.0)))
  s = timer.seconds
  assert s["compile"] > 0
  assert 0.04 < s["checkpoint"] < 0.5
  assert 0.04 < s["train"] < 0.5 + s["compile"]
  total = sum(s.values())
  done = timer.finish(total + 1.0)
  np.testing.assert_allclose(done["other"], 1.0, atol=2e-3)


def test_plots_leave_the_global_backend_alone():
  import matplotlib  # noqa: PLC0415

  before = matplotlib.get_backend()
  matplotlib.use("svg")  # any backend a user chose
  try:
    from experiments.common import plots  # noqa: PLC0415

    png = plots.heatmap_figure(np.eye(3), "R")
    png2 = plots.average_accuracy_figure(
        [{"label": "ewc", "R": np.eye(3)},
         {"label": "joint", "R": np.ones([3, 3]), "dashed": True}])
    assert png[:8] == png2[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)


def test_average_accuracy_plot_has_a_title_and_a_band_over_seeds():
  from experiments.common import plots  # noqa: PLC0415

  runs = [np.tril(np.full([3, 3], a)) for a in (0.5, 0.7, 0.9)]
  mean = np.mean(runs, axis=0)
  fig = plots.average_accuracy_plot(
      [{"label": "ewc", "R": mean, "R_runs": runs},
       {"label": "joint", "R": np.ones([3, 3]), "dashed": True}], "Average")
  (ax,) = fig.axes[:1]
  assert ax.get_title().startswith("Average\nmean over 1/3 seeds")
  (band,) = ax.collections  # joint has one run: no band
  lower, upper = band.get_paths()[0].vertices[:, 1].min(), 100 * (
      metrics.average_accuracy_curve(mean) + np.std(
          [metrics.average_accuracy_curve(r) for r in runs], axis=0)).max()
  np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].max(), upper)
  assert lower < 100 * metrics.average_accuracy_curve(mean).min()
  one = plots.average_accuracy_plot([{"label": "ewc", "R": mean}], "Avg")
  assert one.axes[0].get_title() == "Avg (one seed)"
  assert not one.axes[0].collections
