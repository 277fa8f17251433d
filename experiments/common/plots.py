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


def average_accuracy_figure(curves: Sequence[dict[str, Any]],
                            title: str = "Average accuracy on the tasks seen"
                            ) -> bytes:
  """:func:`average_accuracy_plot` as PNG bytes."""
  return png_bytes(average_accuracy_plot(curves, title))


def average_accuracy_plot(curves: Sequence[dict[str, Any]],
                          title: str = "Average accuracy on the tasks seen"
                          ) -> Figure:
  """Average test accuracy on the tasks seen so far vs tasks trained.

  Args:
    curves: per line, ``label``, ``R`` (an accuracy matrix ``[T, T]``,
      e.g. the mean over seeds), optionally ``R_runs`` (each seed's
      matrix: a band of one standard deviation of their curves is drawn
      around the line when there are two or more) and ``dashed`` (a
      reference line such as joint training).
    title: the figure's title; the number of seeds is added.

  Returns:
    The figure; one line per entry.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  seeds = sorted({len(entry.get("R_runs", ())) or 1 for entry in curves})
  for entry in curves:
    curve = metrics_lib.average_accuracy_curve(np.asarray(entry["R"]))
    x = np.arange(1, len(curve) + 1)
    (line,) = ax.plot(x, 100 * curve, "--" if entry.get("dashed") else "-",
                      marker="o", label=entry["label"])
    runs = entry.get("R_runs") or ()
    if len(runs) > 1:
      spread = np.std([metrics_lib.average_accuracy_curve(np.asarray(r))
                       for r in runs], axis=0)
      ax.fill_between(x, 100 * (curve - spread), 100 * (curve + spread),
                      color=line.get_color(), alpha=0.15, linewidth=0)
  ax.set_xlabel("number of tasks trained")
  ax.set_ylabel("average test accuracy on tasks seen (%)")
  ax.set_xticks(np.arange(1, len(curves[0]["R"]) + 1) if curves else [])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if seeds == [1]:
    ax.set_title(f"{title} (one seed)", fontsize=10)
  else:
    many = "/".join(str(n) for n in seeds)
    ax.set_title(f"{title}\nmean over {many} seeds, band: \u00b11 std over "
                 "seeds", fontsize=10)
  return fig


def heatmap_figure(R: Any, title: str, seeds: int = 1) -> bytes:
  """A heatmap of an accuracy matrix ``R[i, j]`` (task j after task i).

  Args:
    R: the ``[T, T]`` accuracy matrix, in [0, 1] (the mean over seeds).
    title: the figure title; ``mean over N seeds`` is added when ``seeds``
      is more than one.
    seeds: how many seeds' matrices ``R`` is the mean of.

  Returns:
    The PNG bytes, with each cell's accuracy in percent written in it.
  """
  R = np.asarray(R)
  num_tasks = len(R)
  side = max(3.0, 0.6 * num_tasks + 1.5)
  fig = Figure(figsize=(side, side * 0.85))
  ax = fig.add_subplot()
  image = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
  fig.colorbar(image, ax=ax, label="test accuracy (%)" + (
      f", mean over {seeds} seeds" if seeds > 1 else ""))
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
  ax.set_title(title if seeds <= 1 else f"{title}\n(mean over {seeds} seeds)")
  return png_bytes(fig)
