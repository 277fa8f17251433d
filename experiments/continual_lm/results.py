"""Result files of the continual LM experiment: JSON, Markdown table, plot."""

import os
import pathlib
from typing import Any

from experiments.common import files

LABELS = {
    "finetune": "fine-tuning",
    "ewc_sampled": "EWC, sampled Fisher",
    "ewc_empirical": "EWC, empirical Fisher",
    "batched": "EWC, snippet's batched importance",
    "lora": "LoRA",
    "lora_ewc": "LoRA + EWC (sampled, adapters)",
}


def _rise(r: dict) -> float:
  return r["ppl_a_after"] - r["ppl_a_before"]


def results_table(results: dict[str, Any]) -> str:
  """Markdown: every run (test texts), the choice of lambda, the Fishers."""
  runs = results["runs"]
  chosen = results.get("chosen") or {}
  model = results["model"]
  lines = []
  pre = results.get("pretrain")
  if pre:
    lines += [f"Trained on A for {pre['steps']} steps ({pre['seconds']:.0f} "
              f"s); kept step {pre['best_step']} (A validation perplexity "
              f"{pre['ppl_a_val_kept']:.2f}).", ""]
  lines += [
      f"Qwen3, {model['num_params']:,} parameters"
      + (f" (LoRA: {model['lora_params']:,} trainable)"
         if model.get("lora_params") else "")
      + f"; {results['machine']['device']} x "
      f"{results['machine']['devices']}. Held-out test perplexity per token:",
      "",
      "| run | lambda | A before | A after | A rise | B before | B after "
      "| seconds |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  ft = next((r for r in runs if r["method"] == "finetune"), None)
  for r in runs:
    mark = (" (chosen)" if r["method"] == "ewc_sampled"
            and r["lam"] == chosen.get("lam") else "")
    lines.append(
        f"| {LABELS[r['method']]}{mark} | {r['lam']:g} | "
        f"{r['ppl_a_before']:.2f} | {r['ppl_a_after']:.2f} | "
        f"{_rise(r):+.2f} | {r['ppl_b_before']:.2f} | "
        f"{r['ppl_b_after']:.2f} | {r['seconds']:.0f} |")
  best = next((r for r in runs if r["method"] == "ewc_sampled"
               and r["lam"] == chosen.get("lam")), None)
  if chosen:
    lines += ["", f"lambda {chosen['lam']:g} chosen on the validation "
              f"texts: {chosen['rule']}"
              + ("" if chosen.get("met") is not False else
                 " (no lambda met the limit: the lowest B one)") + "."]
  if ft is not None and best is not None and _rise(ft) > 0:
    share = _rise(best) / _rise(ft)
    b_ratio = best["ppl_b_after"] / ft["ppl_b_after"]
    lines += ["", f"On the test texts, EWC (sampled Fisher, lambda "
              f"{best['lam']:g}) keeps the rise of A's perplexity to "
              f"{share:.0%} of fine-tuning's, with B's perplexity "
              f"{b_ratio - 1:+.1%} against fine-tuning's."]
  fisher = results.get("fisher") or {}
  notes = []
  if "ratio_empirical_to_sampled" in fisher:
    notes.append(f"sum(F empirical) / sum(F sampled) = "
                 f"{fisher['ratio_empirical_to_sampled']:.2f}")
  if "ratio_sampled_to_batched" in fisher:
    cfg = results["config"]
    scale = cfg["batched_scale"] or cfg["fisher_batch_size"] * cfg["seq_len"]
    notes.append(f"sum(F sampled) / sum(batched) = "
                 f"{fisher['ratio_sampled_to_batched']:.0f} (batched "
                 f"lambda = lambda x {scale:g}); "
                 f"cosine {fisher['cosine_sampled_batched']:.3f}")
  if notes:
    lines += ["", "Importances on A: " + "; ".join(notes) + "."]
  timing = results.get("timing") or {}
  if timing:
    lines += ["", "Seconds per phase: " + ", ".join(
        f"{k} {v:.0f}" for k, v in timing.items()) + f"; total "
        f"{results['seconds']:.0f}."]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any]) -> bytes:
  """PNG bytes: held-out perplexity of A and of B against fine-tuning steps."""
  # A bare Figure, no pyplot: the process's backend is left alone.
  import matplotlib  # noqa: PLC0415 (optional dependency, lazily)
  from matplotlib.figure import Figure  # noqa: PLC0415

  from experiments.common import plots  # noqa: PLC0415 (matplotlib)

  runs = results["runs"]
  chosen = (results.get("chosen") or {}).get("lam")
  sweep = sorted(r["lam"] for r in runs if r["method"] == "ewc_sampled")
  blues = matplotlib.colormaps["Blues"]
  colors = {"finetune": "black", "ewc_empirical": "tab:green",
            "batched": "tab:orange", "lora": "tab:purple",
            "lora_ewc": "tab:red"}
  fig = Figure(figsize=(10, 3.6), dpi=80)
  axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
  for r in runs:
    if r["method"] == "ewc_sampled":
      shade = 0.35 + 0.65 * sweep.index(r["lam"]) / max(len(sweep) - 1, 1)
      style = dict(color=blues(shade), linewidth=2.4 if r["lam"] == chosen
                   else 1.0, label=f"EWC sampled lam={r['lam']:g}")
    else:
      style = dict(color=colors[r["method"]], linewidth=1.6,
                   linestyle="--" if r["method"].startswith("lora") else "-",
                   label=LABELS[r["method"]])
    for ax, key in zip(axes[:2], ("ppl_a", "ppl_b")):
      ax.plot(r["eval_steps"], r[key], **style)
  axes[0].set_title("held-out A (old): lower = kept", fontsize=9)
  axes[1].set_title("held-out B (new): lower = learnt", fontsize=9)
  for ax in axes[:2]:
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("perplexity (per token)")
    ax.grid(alpha=0.3)
  ax = axes[2]
  for r in runs:
    ax.scatter(r["ppl_b_after"], r["ppl_a_after"], s=24,
               color=blues(0.8) if r["method"] == "ewc_sampled"
               else colors[r["method"]])
  pts = sorted((r["ppl_b_after"], r["ppl_a_after"], r["lam"]) for r in runs
               if r["method"] == "ewc_sampled")
  ax.plot([p[0] for p in pts], [p[1] for p in pts], color=blues(0.8),
          linewidth=1)
  for b, a, lam in pts:
    ax.annotate(f"{lam:g}", (b, a), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
  ax.set_xlabel("B perplexity after")
  ax.set_ylabel("A perplexity after")
  ax.set_title("trade-off (test texts)", fontsize=9)
  ax.grid(alpha=0.3)
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  return plots.png_bytes(fig)


OUTPUTS = ("results.json", "results.md", "perplexity.png", "state.json",
           "pretrained", "finetuned")


def check_out(out: str, overwrite: bool, resume: bool = False) -> None:
  """Refuses, before any training, an output directory that would lose
  results: a previous run's (without ``overwrite`` or ``resume``), or one
  whose files could not be written (a file, an unwritable place).

  Nothing is created here.

  Raises:
    ValueError: one line naming ``out`` and what to do.
  """
  if not out.strip():  # pathlib would read "" as "."
    raise ValueError("--out is empty: name the output directory.")
  if overwrite and resume:
    raise ValueError("--overwrite and --resume exclude each other: replace "
                     "the run in --out, or continue it.")
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a directory; choose "
                     "another --out.")
  old = [name for name in OUTPUTS if (out / name).exists()]
  if resume and not (out / "state.json").exists():
    raise ValueError(f"--resume: {out} holds no run to continue (no "
                     "state.json); run without --resume.")
  if old and not (overwrite or resume):
    raise ValueError(
        f"--out {out} already holds a run ({', '.join(old)}); pass --resume "
        "to continue it, --overwrite to replace it, or choose another --out.")
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
  if results["runs"]:
    files.write_atomic(out / "perplexity.png", plot(results))
