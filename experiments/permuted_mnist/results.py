"""Results: one run's outcome, lambda selection, aggregation, files, tables.

The lambda of each method is chosen on validation accuracy (held out from the
training data); test numbers are only reported.
"""

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from experiments.common import files
from experiments.common import metrics as metrics_lib
from experiments.common import timing as timing_lib
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import methods as methods_lib


@dataclasses.dataclass
class MethodResult:
  """The outcome of one (method, lambda, seed) run.

  Attributes:
    method: the method's name.
    seed: the seed (model init and data order; the stream's seed too).
    lam: the strength from the sweep (SI: Zenke's ``c``; 0 if none).
    R: test accuracy ``[T, T]``: ``R[i, j]`` on task ``j`` after task ``i``.
    R_val: the same on the validation splits (used to choose ``lam``).
    b: test accuracy of the initial model on each task ``[T]``.
    b_val: the same on the validation splits.
    time_s: wall time of the run, compilation included.
    train_loss: per task, the mean training loss of each chunk.
    timing: seconds per phase (compile, train, fisher, eval, checkpoint).
  """

  method: str
  seed: int
  lam: float
  R: np.ndarray
  R_val: np.ndarray
  b: np.ndarray
  b_val: np.ndarray
  time_s: float
  train_loss: list[list[float]]
  timing: dict[str, float] = dataclasses.field(default_factory=dict)

  def metrics(self) -> dict[str, Any]:
    """ACC, BWT, FWT, forgetting on test, and ACC on validation.

    ``joint`` is trained once on all tasks (its ``R`` has identical rows),
    so its FWT is undefined and reported as ``None``.
    """
    out = metrics_lib.summarize(self.R, self.b)
    if methods_lib.get(self.method).joint:
      out["fwt"] = None
    out["val_acc"] = metrics_lib.acc(self.R_val)
    return out

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict, metrics included."""
    return {
        "method": self.method, "seed": self.seed, "lam": self.lam,
        **self.metrics(), "time_s": self.time_s, "R": self.R.tolist(),
        "R_val": self.R_val.tolist(), "b": self.b.tolist(),
        "b_val": self.b_val.tolist(), "train_loss": self.train_loss,
        "timing": self.timing,
    }

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> "MethodResult":
    """The inverse of :meth:`to_json` (the metrics are recomputed).

    JSON keeps every bit of a float64, so ``R`` is read back exactly.
    """
    arrays = {k: np.asarray(row[k], np.float64)
              for k in ("R", "R_val", "b", "b_val")}
    return cls(method=row["method"], seed=int(row["seed"]),
               lam=float(row["lam"]), time_s=float(row["time_s"]),
               train_loss=row["train_loss"], timing=row.get("timing", {}),
               **arrays)


def result_config(config: Any) -> dict[str, Any]:
  """The config fields that can change a run's results, JSON-ready."""
  return {k: v for k, v in config.to_json().items()
          if k not in config_lib.RESULT_NEUTRAL}


def run_digest(config: Any, dataset_info: dict[str, Any]) -> str:
  """SHA-256 of the result-affecting config fields and the data's digest.

  Each ``runs.json`` row carries it, so that a resumed run reuses only rows
  trained with its own config and data.
  """
  blob = json.dumps({"config": result_config(config),
                     "data": dataset_info.get("sha256")}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def select(results: Sequence[MethodResult]) -> dict[str, float]:
  """Each method's lambda with the best mean validation ACC over seeds.

  Args:
    results: runs of any methods, lambdas and seeds.

  Returns:
    ``{method: lam}``. Ties go to the smaller lambda.
  """
  scores: dict[str, dict[float, list[float]]] = {}
  for r in results:
    scores.setdefault(r.method, {}).setdefault(r.lam, []).append(
        metrics_lib.acc(r.R_val))
  return {m: max(sorted(by_lam), key=lambda lam: np.mean(by_lam[lam]))
          for m, by_lam in scores.items()}


def aggregate(results: Sequence[MethodResult],
              chosen: dict[str, float]) -> list[dict[str, Any]]:
  """Mean and std over seeds of each method's metrics at its chosen lambda.

  Args:
    results: all runs.
    chosen: ``{method: lam}`` from :func:`select`.

  Returns:
    One row per method (in first-seen order) with ``method``, ``lam``,
    ``seeds`` and ``<metric>_mean`` / ``<metric>_std`` for ``acc``, ``bwt``,
    ``fwt``, ``forgetting``, ``val_acc`` and ``time_s``; ``R_mean`` is the
    accuracy matrix averaged over seeds; ``timing`` the mean seconds per
    phase (compile, train, fisher, eval, checkpoint) of one run.
  """
  rows = []
  for method, lam in chosen.items():
    runs = [r for r in results if r.method == method and r.lam == lam]
    row = {"method": method, "lam": lam, "seeds": [r.seed for r in runs]}
    for name in ("acc", "bwt", "fwt", "forgetting", "val_acc", "time_s"):
      values = [r.time_s if name == "time_s" else r.metrics()[name]
                for r in runs]
      if any(v is None for v in values):
        row[f"{name}_mean"] = row[f"{name}_std"] = None
      else:
        row[f"{name}_mean"] = float(np.mean(values))
        row[f"{name}_std"] = float(np.std(values))
    row["R_mean"] = np.mean([r.R for r in runs], axis=0).tolist()
    row["timing"] = {name: float(np.mean([r.timing.get(name, 0.0)
                                          for r in runs]))
                     for name in timing_lib.PHASES}
    rows.append(row)
  return rows


def write_results(workdir: pathlib.Path, config: Any,
                  dataset_info: dict[str, Any],
                  results: Sequence[MethodResult], *,
                  final: bool) -> dict[str, Any]:
  """Writes every result file (after each run, so partial runs survive).

  Files: ``config.json``; ``runs.json`` and ``runs.csv`` (every method,
  lambda and seed, with R, R_val, b and metrics; each ``runs.json`` row
  also holds its result-affecting ``config`` and their :func:`run_digest`
  ``config_sha256``); ``accuracy.csv`` (R and b
  in long form); ``summary.json`` and ``summary.csv`` (per method, the
  lambda chosen on validation and mean/std over seeds); ``R_<method>.csv``
  (the seed-averaged R at the chosen lambda); and, when ``final``, the plots
  ``avg_accuracy.png`` and ``R_<method>.png``.

  Args:
    workdir: the run directory.
    config: the resolved configuration.
    dataset_info: name, description and sizes of the data.
    results: the runs so far.
    final: also draw the plots.

  Returns:
    The summary dict written to ``summary.json``.
  """
  files.write_json(workdir / "config.json",
             {"config": config.to_json(), "dataset": dataset_info})
  tie = {"config_sha256": run_digest(config, dataset_info),
         "config": result_config(config)}
  files.write_json(workdir / "runs.json",
                   [{**r.to_json(), **tie} for r in results])
  names = ("acc", "bwt", "fwt", "forgetting", "val_acc")
  chosen = select(results)
  files.write_csv(workdir / "runs.csv",
            ["method", "lam", "seed", *names, "time_s", "selected"],
            [[r.method, r.lam, r.seed, *(r.metrics()[n] for n in names),
              round(r.time_s, 3), chosen.get(r.method) == r.lam]
             for r in results])
  long_rows = []
  for r in results:
    for split, mat, init in (("test", r.R, r.b), ("val", r.R_val, r.b_val)):
      long_rows += [[r.method, r.lam, r.seed, split, -1, j, init[j]]
                    for j in range(len(init))]
      long_rows += [[r.method, r.lam, r.seed, split, i, j, mat[i, j]]
                    for i in range(len(mat)) for j in range(len(mat))]
  files.write_csv(workdir / "accuracy.csv",
            ["method", "lam", "seed", "split", "after_task", "task",
             "accuracy"], long_rows)
  rows = aggregate(results, chosen)
  sweep = {}
  for r in results:
    sweep.setdefault(r.method, {}).setdefault(str(r.lam), []).append(
        metrics_lib.acc(r.R_val))
  summary = {
      "methods": rows,
      "val_acc_by_lam": {m: {lam: float(np.mean(v)) for lam, v in d.items()}
                         for m, d in sweep.items()},
      "complete": final,
  }
  files.write_json(workdir / "summary.json", summary)
  cols = [f"{n}_{s}" for n in (*names, "time_s") for s in ("mean", "std")]
  files.write_csv(workdir / "summary.csv",
                  ["method", "lam", "num_seeds", *cols],
            [[row["method"], row["lam"], len(row["seeds"]),
              *(row[c] for c in cols)] for row in rows])
  for row in rows:
    mat = row["R_mean"]
    files.write_csv(workdir / f"R_{row['method']}.csv",
              ["after_task", *(f"task_{j}" for j in range(len(mat)))],
              [[i, *mat[i]] for i in range(len(mat))])
  if final:
    for name, png in render_plots(rows, results).items():
      files.write_atomic(workdir / name, png)
  return summary


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The summary table: method, lambda, ACC, BWT, FWT, forgetting, time.

  Args:
    rows: from :func:`aggregate`.

  Returns:
    A fixed-width text table; ``mean +- std`` when there are several seeds.
  """
  def cell(row, name, scale=100.0, digits=2):
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None:
      return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if len(row["seeds"]) > 1:
      text += f" +- {std * scale:.{digits}f}"
    return text

  header = ["method", "lam", "ACC %", "BWT %", "FWT %", "forget %",
            "val ACC %", "time s"]
  body = [[r["method"], f"{r['lam']:g}", cell(r, "acc"), cell(r, "bwt"),
           cell(r, "fwt"), cell(r, "forgetting"), cell(r, "val_acc"),
           cell(r, "time_s", 1.0, 1)] for r in rows]
  columns = zip(header, *body, strict=True)
  widths = [max(len(str(x)) for x in col) for col in columns]
  lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True))
           for line in [header, *body]]
  lines.insert(1, "-" * len(lines[0]))
  lines.append("lam: the strength chosen on validation (si: Zenke's c, pull "
               "2c); time: per run, compilation included.")
  return "\n".join(lines)


def _title(row: dict[str, Any]) -> str:
  """``method`` or ``method, lam=X`` for methods with a strength."""
  if methods_lib.get(row["method"]).lam_field is None:
    return row["method"]
  return f"{row['method']}, lam={row['lam']:g}"


def render_plots(rows: Sequence[dict[str, Any]],
                 results: Sequence[MethodResult] = ()) -> dict[str, bytes]:
  """All plots of a run, as PNG bytes by file name.

  Args:
    rows: from :func:`aggregate`.
    results: every run; each method's runs at its chosen lambda give the
      band of the spread over seeds in ``avg_accuracy.png``.

  Returns:
    ``{"avg_accuracy.png": ..., "R_<method>.png": ...}``: the mean over
    seeds, which the titles say.
  """
  from experiments.common import plots  # noqa: PLC0415 (matplotlib is slow)

  def runs(row):
    return [r.R for r in results
            if r.method == row["method"] and r.lam == row["lam"]]

  curves = [{"label": _title(row).replace(", lam=", " (lam=")
                      + (")" if "lam=" in _title(row) else ""),
             "R": row["R_mean"], "R_runs": runs(row),
             "dashed": methods_lib.get(row["method"]).joint} for row in rows]
  pngs = {"avg_accuracy.png": plots.average_accuracy_figure(
      curves, "Average test accuracy on the tasks seen so far")}
  for row in rows:
    pngs[f"R_{row['method']}.png"] = plots.heatmap_figure(
        row["R_mean"], _title(row), seeds=len(row["seeds"]))
  return pngs


def format_timing(rows: Sequence[dict[str, Any]]) -> str:
  """Seconds per phase of one run of each method (mean over seeds)."""
  header = ["method", *timing_lib.PHASES, "total"]
  body = [[row["method"], *(f"{row['timing'].get(p, 0.0):.1f}"
                            for p in timing_lib.PHASES),
           f"{sum(row['timing'].values()):.1f}"] for row in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True))
           for line in [header, *body]]
  lines.insert(1, "-" * len(lines[0]))
  lines.append("seconds per run and phase (compile: tracing and XLA "
               "compilation, wherever it happened; other: model init, "
               "checkpoint restore, Python).")
  return "\n".join(lines)
