"""PNG plots of a run: average accuracy curves and accuracy-matrix heatmaps.

Figures are built as ``matplotlib.figure.Figure`` objects drawn by an Agg
canvas of their own: matplotlib's global backend (and a notebook's inline
plots) is never touched. Every PNG is rendered to memory; the caller writes
the bytes atomically.
"""

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.common import metrics as metrics_lib


def png_bytes(fig: Figure) -> bytes:
  """Renders ``fig`` with its own Agg canvas to PNG bytes."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  return buf.getvalue()


def average_accuracy_figure(curves: Sequence[dict[str, Any]]) -> bytes:
  """Average test accuracy on the tasks seen so far vs tasks trained.

  Args:
    curves: per line, ``label``, ``R`` (an accuracy matrix ``[T, T]``) and
      optionally ``dashed`` (a reference line such as joint training).

  Returns:
    The PNG bytes; one line per entry.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for entry in curves:
    curve = metrics_lib.average_accuracy_curve(np.asarray(entry["R"]))
    ax.plot(np.arange(1, len(curve) + 1), 100 * curve,
            "--" if entry.get("dashed") else "-", marker="o",
            label=entry["label"])
  ax.set_xlabel("number of tasks trained")
  ax.set_ylabel("average test accuracy on tasks seen (%)")
  ax.set_xticks(np.arange(1, len(curves[0]["R"]) + 1) if curves else [])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return png_bytes(fig)


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
  fig = Figure(figsize=(side, side * 0.85))
  ax = fig.add_subplot()
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
  return png_bytes(fig)
