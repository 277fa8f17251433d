"""PNG plots of a run: average accuracy curves and accuracy-matrix heatmaps.

Matplotlib runs with the non-interactive Agg backend; every PNG is rendered
to memory (the caller writes the bytes atomically).
"""

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import metrics as metrics_lib  # noqa: E402


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def average_accuracy_figure(rows: Sequence[dict[str, Any]]) -> bytes:
  """Average test accuracy on the tasks seen so far vs tasks trained.

  Args:
    rows: per method, ``method``, ``lam`` and ``R_mean`` (the seed-averaged
      accuracy matrix), as from ``experiments.train.aggregate``.

  Returns:
    The PNG bytes; one line per method.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in rows:
    curve = metrics_lib.average_accuracy_curve(np.asarray(row["R_mean"]))
    label = row["method"]
    if row["method"] not in ("finetune", "joint"):
      label += f" (lam={row['lam']:g})"
    style = "--" if row["method"] == "joint" else "-"
    ax.plot(np.arange(1, len(curve) + 1), 100 * curve, style, marker="o",
            label=label)
  ax.set_xlabel("number of tasks trained")
  ax.set_ylabel("average test accuracy on tasks seen (%)")
  ax.set_xticks(np.arange(1, len(rows[0]["R_mean"]) + 1) if rows else [])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _png(fig)


def heatmap_figure(R: Any, title: str) -> bytes:
  """A heatmap of an accuracy matrix ``R[i, j]`` (task j after task i).

  Args:
    R: the ``[T, T]`` accuracy matrix, in [0, 1].
    title: the figure title.

  Returns:
    The PNG bytes, with each cell's accuracy in percent written in it.
  """
  R = np.asarray(R)
  num_tasks = len(R)
  side = max(3.0, 0.6 * num_tasks + 1.5)
  fig, ax = plt.subplots(figsize=(side, side * 0.85))
  image = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
  fig.colorbar(image, ax=ax, label="test accuracy (%)")
  if num_tasks <= 12:
    for i in range(num_tasks):
      for j in range(num_tasks):
        ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center",
                color="white" if R[i, j] < 0.6 else "black", fontsize=8)
  ticks = np.arange(num_tasks)
  ax.set_xticks(ticks, [str(t + 1) for t in ticks])
  ax.set_yticks(ticks, [str(t + 1) for t in ticks])
  ax.set_xlabel("evaluated on task")
  ax.set_ylabel("after training task")
  ax.set_title(title)
  return _png(fig)


def render_plots(rows: Sequence[dict[str, Any]]) -> dict[str, bytes]:
  """All plots of a run, as PNG bytes by file name.

  Args:
    rows: from ``experiments.train.aggregate``.

  Returns:
    ``{"avg_accuracy.png": ..., "R_<method>.png": ...}``.
  """
  pngs = {"avg_accuracy.png": average_accuracy_figure(rows)}
  for row in rows:
    title = row["method"]
    if row["method"] not in ("finetune", "joint"):
      title += f", lam={row['lam']:g}"
    pngs[f"R_{row['method']}.png"] = heatmap_figure(row["R_mean"], title)
  return pngs
