"""Result files of the continual LM experiment: JSON, Markdown table, plot."""

import os
import pathlib
from typing import Any

from experiments.common import files


def results_table(results: dict[str, Any]) -> str:
  """Markdown tables: every run, then EWC against batched at matched lambda."""
  scale = results["config"]["batched_scale"] or results["config"][
      "fisher_batch_size"]
  pre = results["pretrain"]
  lines = [
      f"Trained on A for {pre['steps']} steps ({results['num_params']:,} "
      f"parameters); kept step {pre['best_step']}: held-out perplexity A "
      f"{pre['ppl_a_kept']:.2f}, B {pre['ppl_b_kept']:.2f}; final training "
      f"loss {pre['final_train_loss']:.3f} nats/byte.",
      "",
      "| method | importance | lambda (raw) | lambda (per-example scale) | "
      "ppl A before | ppl A after | ppl B before | ppl B after |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["runs"]:
    lines.append(
        f"| {r['method']} | {r['estimator'] or '-'} | {r['lam']:g} | "
        f"{r['lam_matched']:g} | {r['ppl_a_before']:.2f} | "
        f"{r['ppl_a_after']:.2f} | {r['ppl_b_before']:.2f} | "
        f"{r['ppl_b_after']:.2f} |")
  by = {(r["method"], r["lam_matched"]): r for r in results["runs"]}
  matched = sorted({lam for m, lam in by if m == "ewc"}
                   & {lam for m, lam in by if m == "batched"})
  if matched:
    lines += [
        "",
        f"Per-example Fisher (ewc) against the batched importance run at "
        f"lambda x {scale:g}:",
        "",
        "| lambda (per-example scale) | ppl A ewc | ppl A batched | "
        "ppl B ewc | ppl B batched |",
        "|---:|---:|---:|---:|---:|",
    ]
    for lam in matched:
      e, b = by[("ewc", lam)], by[("batched", lam)]
      lines.append(
          f"| {lam:g} | {e['ppl_a_after']:.2f} | {b['ppl_a_after']:.2f} | "
          f"{e['ppl_b_after']:.2f} | {b['ppl_b_after']:.2f} |")
  ratio = results["importance"].get("ratio_empirical_to_batched")
  if ratio is not None:
    cosine = results["importance"]["cosine_empirical_batched"]
    lines += ["", f"Measured sum(F per-example) / sum(F batched) = "
              f"{ratio:.1f} (fisher_batch_size "
              f"{results['config']['fisher_batch_size']}); cosine similarity "
              f"of the two importances: {cosine:.3f}."]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any]) -> bytes:
  """PNG bytes: held-out perplexity of A and of B against fine-tuning steps."""
  # A bare Figure, no pyplot: the process's backend is left alone.
  import matplotlib  # noqa: PLC0415 (optional dependency, lazily)
  from matplotlib.figure import Figure  # noqa: PLC0415

  from experiments.common import plots  # noqa: PLC0415 (matplotlib)

  runs = results["runs"]
  lams = sorted({r["lam_matched"] for r in runs if r["method"] != "finetune"})
  shades = {lam: 0.8 if len(lams) == 1 else 0.4 + 0.6 * i / (len(lams) - 1)
            for i, lam in enumerate(lams)}
  fig = Figure(figsize=(9, 3.4), dpi=80)
  axes = fig.subplots(1, 2)
  for r in runs:
    if r["method"] == "finetune":
      style = dict(color="black", label="finetune")
    else:
      ewc = r["method"] == "ewc"
      cmap = matplotlib.colormaps["Blues" if ewc else "Oranges"]
      style = dict(color=cmap(shades[r["lam_matched"]]),
                   linestyle="-" if ewc else "--",
                   linewidth=2.4 if ewc else 1.4,
                   label=f"{r['method']} lam={r['lam']:g}")
    for ax, key in zip(axes, ("ppl_a", "ppl_b")):
      ax.plot(r["eval_steps"], r[key], **style)
  axes[0].set_title("held-out A (old): lower = kept")
  axes[1].set_title("held-out B (new): lower = learnt")
  for ax in axes:
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("perplexity (per byte)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  return plots.png_bytes(fig)


OUTPUTS = ("results.json", "results.md", "perplexity.png")


def check_out(out: str, overwrite: bool) -> None:
  """Refuses, before any training, an output directory that would lose
  results: a previous run's (without ``overwrite``), or a run's whose files
  could not be written at its end (a file, an unwritable place).

  Nothing is created here.

  Raises:
    ValueError: one line naming ``out`` and what to do.
  """
  if not out.strip():  # pathlib would read "" as "."
    raise ValueError("--out is empty: name the output directory.")
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a directory; choose "
                     "another --out.")
  old = [name for name in OUTPUTS if (out / name).exists()]
  if old and not overwrite:
    raise ValueError(
        f"--out {out} already holds a run's results ({', '.join(old)}); "
        "pass --overwrite to replace them, or choose another --out.")
  parent = out
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"--out {out}: {parent} is a file, not a directory; "
                     "choose another --out.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out {out}: {parent} is not writable; choose "
                     "another --out.")


def write_outputs(results: dict[str, Any], out: pathlib.Path) -> None:
  """``results.json``, ``results.md`` and ``perplexity.png`` in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  files.write_json(out / "results.json", results)
  files.write_atomic(out / "results.md", results_table(results))
  files.write_atomic(out / "perplexity.png", plot(results))

