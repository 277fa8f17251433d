r"""Permuted MNIST with EWC, online EWC, SI, L2, fine-tuning and joint training.

The command line only: the work is in ``experiments.train``.

Examples:
  python -m experiments.permuted_mnist                      # quick preset
  python -m experiments.permuted_mnist --methods finetune,ewc \
      --lam 10,100,1000 --seeds 0,1,2 --out runs/sweep
  python -m experiments.permuted_mnist --preset vandeven2019 \
      --dataset mnist --data-dir DIR
  python -m experiments.permuted_mnist --tasks split_task --num-tasks 5 \
      --set epochs=2 --set hidden=400,400

``--lam`` takes either one list, used by every regularised method in the
run (``ewc``, ``online_ewc``, ``l2``, and ``si``'s ``c``), or
``METHOD=LIST`` for one method (repeatable): ``--lam ewc=100,1000
--lam si=0.5,1``. Each value runs separately; the value with the best
validation accuracy (held out from the training data) is reported.

Every run is checkpointed (after each task and every ``--checkpoint-every``
steps). ``--resume RUN_DIR`` continues an interrupted experiment where it
stopped, with the config saved in RUN_DIR; flags given with it must agree
with that config (only ``--no-progress`` and ``keep_checkpoints`` may
differ). The resumed results equal an uninterrupted run's exactly:
  python -m experiments.permuted_mnist --out runs/a      # killed midway
  python -m experiments.permuted_mnist --resume runs/a
"""

import argparse
import sys
from typing import Optional, Sequence

from experiments import config as config_lib
from experiments import sweep
from experiments import train


def _flags() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.permuted_mnist",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any config field: --set FIELD=VALUE (see experiments/config.py)."
  )
  p.add_argument("--preset", choices=sorted(config_lib.PRESETS),
                 help="base configuration (default: quick; with --resume, "
                 "the saved config)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override any config field, e.g. --set epochs=3")
  p.add_argument("--methods", help="comma list from "
                 + ",".join(config_lib.METHODS))
  p.add_argument("--lam", action="append", default=[],
                 metavar="[METHOD=]LIST",
                 help="strength sweep, chosen on validation (see above)")
  p.add_argument("--gamma", help="online EWC's decay")
  p.add_argument("--seeds", help="comma list of seeds, e.g. 0,1,2")
  p.add_argument("--dataset", help="auto|mnist|fashion_mnist|idx|embedded|"
                 "synthetic")
  p.add_argument("--data-dir", help="IDX or TFDS directory")
  p.add_argument("--tasks", choices=("permuted", "rotated", "split_task",
                                     "split_domain"))
  p.add_argument("--num-tasks")
  p.add_argument("--model", choices=("mlp", "cnn"))
  p.add_argument("--hidden", help="MLP widths, e.g. 400,400")
  p.add_argument("--epochs", help="epochs per task")
  p.add_argument("--iterations", help="steps per task (overrides epochs)")
  p.add_argument("--batch-size")
  p.add_argument("--lr", dest="learning_rate", help="learning rate")
  p.add_argument("--optimizer", choices=config_lib.OPTIMIZERS)
  p.add_argument("--fisher", choices=("exact", "sampled", "empirical",
                                      "batched"), help="Fisher estimator")
  p.add_argument("--fisher-examples", help="Fisher budget (None: all)")
  p.add_argument("--checkpoint-every",
                 help="checkpoint every N steps within a task (and after "
                 "each task)")
  p.add_argument("--mesh", dest="data_parallel",
                 help="devices for data-parallel training (0: every local "
                 "device, the default; 1: one device)")
  p.add_argument("--out", help="run directory (default runs/PRESET-TIME)")
  p.add_argument("--overwrite", action="store_true",
                 help="allow a non-empty run directory")
  p.add_argument("--resume", metavar="RUN_DIR",
                 help="continue the interrupted experiment in RUN_DIR")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
  p.add_argument("--vmap", action="store_true",
                 help="train each method's lambdas as one vmapped program "
                 "(experiments.sweep); not checkpointed")
  p.add_argument("--data-seed", type=int,
                 help="with --vmap: one task stream from this seed, so that "
                 "lambdas x seeds train in one program")
  return p


_FIELD_FLAGS = ("methods", "gamma", "seeds", "dataset", "data_dir", "tasks",
                "num_tasks", "model", "hidden", "epochs", "iterations",
                "batch_size", "learning_rate", "optimizer", "fisher",
                "fisher_examples", "checkpoint_every", "data_parallel")


def lam_assignments(values: Sequence[str],
                    methods: Sequence[str]) -> list[str]:
  """Turns ``--lam`` values into ``FIELD=LIST`` assignments.

  Args:
    values: each ``LIST`` (for every regularised method in ``methods``) or
      ``METHOD=LIST``.
    methods: the methods of the run.

  Returns:
    Assignments for :func:`experiments.config.override`.
  """
  out = []
  for value in values:
    method, sep, numbers = value.partition("=")
    if not sep:
      regularised = [m for m in methods if m in config_lib.LAM_FIELDS]
      out += [f"{config_lib.LAM_FIELDS[m]}={value}" for m in regularised]
    elif method in config_lib.LAM_FIELDS:
      out.append(f"{config_lib.LAM_FIELDS[method]}={numbers}")
    else:
      raise ValueError(
          f"--lam {value}: {method!r} has no strength; choose from "
          f"{sorted(config_lib.LAM_FIELDS)}.")
  return out


def resolve(args: argparse.Namespace,
            base: Optional[config_lib.Config] = None) -> config_lib.Config:
  """The configuration from the preset, ``--set`` and the explicit flags.

  Args:
    args: the parsed flags.
    base: the configuration the flags change (default: ``--preset``'s).
  """
  if base is None:
    base = config_lib.get_config(args.preset or "quick")
  config = config_lib.override(base, args.set)
  explicit = [f"{name}={getattr(args, name)}" for name in _FIELD_FLAGS
              if getattr(args, name) is not None]
  if args.no_progress:
    explicit.append("progress=false")
  config = config_lib.override(config, explicit)
  return config_lib.override(config, lam_assignments(args.lam,
                                                     config.methods))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses flags, runs the experiment, prints the summary table.

  Args:
    argv: the arguments (default ``sys.argv[1:]``).

  Returns:
    The exit status.
  """
  parser = _flags()
  args = parser.parse_args(argv)
  try:
    if args.vmap and args.resume:
      raise ValueError("--vmap runs are not checkpointed: --resume cannot "
                       "continue them.")
    if args.data_seed is not None and not args.vmap:
      raise ValueError("--data-seed needs --vmap.")
    if args.resume:
      if args.out or args.overwrite:
        raise ValueError(
            "--resume continues RUN_DIR in place: drop --out and "
            "--overwrite.")
      workdir = args.resume
      # The saved config, changed by the flags given (if any): it must
      # still equal the saved one.
      base = None if args.preset else train.saved_config(workdir)
      config = resolve(args, base)
      train.check_resume(workdir, config)
    else:
      config = resolve(args)
      workdir = args.out or train.default_workdir(config)
      train.prepare_workdir(workdir, args.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    parser.error(str(e))
  # Said first, so that a run killed midway knows where to resume from.
  print(f"run directory: {workdir} (continue an interrupted run with "
        f"--resume {workdir})", flush=True)
  try:
    if args.vmap:
      summary = sweep.run_experiment(config, workdir,
                                     overwrite=args.overwrite,
                                     data_seed=args.data_seed)
    else:
      summary = train.run_experiment(config, workdir,
                                     overwrite=args.overwrite,
                                     resume=bool(args.resume))
  except (train.DataError, train.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"results in {summary['workdir']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
