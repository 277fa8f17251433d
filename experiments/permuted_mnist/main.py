r"""Permuted MNIST with EWC, online EWC, SI, L2, fine-tuning and joint training.

Flags only: the work is in ``experiment.train_and_evaluate``. Every field of
the configuration (``config.Config``) is a flag, listed below.

Examples:
  python -m experiments.permuted_mnist                      # quick preset
  python -m experiments.permuted_mnist --methods finetune,ewc \
      --lam 10,100,1000 --seeds 0,1,2 --out runs/sweep
  python -m experiments.permuted_mnist --preset vandeven2019 \
      --dataset mnist --data-dir DIR
  python -m experiments.permuted_mnist --tasks split_task --epochs 2 \
      --hidden 400,400                      # 5 tasks: pairs of digits

Lists take commas or spaces (``--seeds 0,1,2`` or ``--seeds 0 1 2``);
``--set FIELD=VALUE`` sets any field too; ``--lr`` and ``--mesh`` are short
for ``--learning-rate`` and ``--data-parallel``. ``--lam`` takes either one
list, used by every regularised method in the run (``ewc``, ``online_ewc``,
``l2``, and ``si``'s ``c``), or ``METHOD=LIST`` for one method (repeatable):
``--lam ewc=100,1000 --lam si=0.5,1``. The value with the best validation
accuracy (held out from the training data) is reported. ``--tasks
split_task`` and ``split_domain`` (5 pairs of digits) run 5 tasks unless
``--num-tasks`` says otherwise.

One process per run directory (a second one is refused). Every run is
checkpointed (after each task, and every ``--checkpoint-every`` steps if set;
the two latest are kept, and a damaged one falls back to the one before).
``--resume RUN_DIR`` continues an interrupted experiment with the config
saved in RUN_DIR; flags given with it must agree with that config
(only ``--no-progress`` and ``--keep-checkpoints`` may differ):
  python -m experiments.permuted_mnist --out runs/a      # killed midway
  python -m experiments.permuted_mnist --resume runs/a

``--logdir DIR`` writes live TensorBoard curves (``tensorboard --logdir
DIR``), one subdirectory per run; ``--wandb`` sends them to Weights & Biases
(needs ``wandb``).
"""

import argparse
import dataclasses
import logging
import pathlib
import shutil
import sys
from typing import Annotated, Any, Optional, Sequence

import tyro

from experiments import data as data_lib
from experiments.common import cli
from experiments.permuted_mnist import budget
from experiments.permuted_mnist import checkpointing
from experiments.permuted_mnist import config as config_lib
from experiments.permuted_mnist import experiment
from experiments.permuted_mnist import loop
from experiments.permuted_mnist import monitor
from experiments.permuted_mnist import results as results_lib
from experiments.permuted_mnist import tasks as tasks_lib
from experiments.permuted_mnist import workdir as workdir_lib

logger = logging.getLogger("experiments.permuted_mnist")
PROG = "python -m experiments.permuted_mnist"
ALIASES = {"--lr": "--learning-rate", "--mesh": "--data-parallel"}


@dataclasses.dataclass(frozen=True)
class Flags:
  """The command line: the configuration's fields and how to run it.

  Attributes:
    config: every field of the experiment's configuration.
    out: run directory (default runs/PRESET-TIME-PID, a new one per run).
    overwrite: replace a previous run in --out. Its files are moved into
      --out/previous/ and deleted only once the new run is complete (a run
      killed midway or stopped by a full disk leaves them there). Refused
      for a directory that never held a run or that holds files the
      runner did not write.
    resume: continue the interrupted experiment in this RUN_DIR.
    vmap: train each method's lambdas as one vmapped program (not
      checkpointed).
    data_seed: with --vmap: one task stream from this seed, so that lambdas
      x seeds train in one program.
    output: messages and live metrics (--quiet, --logdir, --wandb, ...).
  """

  config: Annotated[config_lib.Config, tyro.conf.arg(name="")]
  out: Optional[str] = None
  overwrite: bool = False
  resume: Optional[str] = None
  vmap: bool = False
  data_seed: Optional[int] = None
  output: Annotated[cli.OutputFlags, tyro.conf.arg(name="")] = (
      cli.OutputFlags())


def set_to_flags(assignments: Sequence[str]) -> list[str]:
  """``--set FIELD=VALUE`` as the field's own flag (``--field VALUE``).

  Raises:
    ValueError: no ``=``, or an unknown field (the valid ones listed).
  """
  names = [f.name for f in dataclasses.fields(config_lib.Config)]
  out = []
  for item in assignments:
    field, sep, value = item.partition("=")
    field = field.strip().replace("-", "_")
    if not sep:
      raise ValueError(f"--set expects FIELD=VALUE, got {item!r}.")
    if field not in names:
      raise ValueError(
          f"unknown config field {field!r}; valid fields: "
          f"{', '.join(sorted(names))}.")
    out += ["--" + field.replace("_", "-"), value]
  return out


def lam_words(occurrences: Sequence[Sequence[str]]) -> list[str]:
  """Each ``--lam`` occurrence's words as ``LIST`` / ``METHOD=LIST`` values.

  A list may be written with commas or spaces (``--lam 1,10``, ``--lam 1
  10``, ``--lam ewc=1 10 si=2``): a word with ``=`` starts a method's list,
  other words continue the list before them.
  """
  values = []
  for words in occurrences:
    group = []
    for word in words:
      if "=" in word or not group:
        group.append(word)
      else:
        group[-1] += "," + word
    values += group
  return values


def lam_assignments(values: Sequence[str],
                    methods: Sequence[str]) -> dict[str, tuple[float, ...]]:
  """Turns ``--lam`` values into config changes ``{field: sweep}``.

  Args:
    values: each ``LIST`` (for every regularised method in ``methods``) or
      ``METHOD=LIST``.
    methods: the methods of the run.

  Raises:
    ValueError: a method without a strength or not in ``methods``, or a
      value that is no number. A later value replaces an earlier one.
  """
  changes = {}
  for value in values:
    method, sep, numbers = value.partition("=")
    if not sep:
      fields = [config_lib.LAM_FIELDS[m] for m in methods
                if m in config_lib.LAM_FIELDS]
      numbers = value
    elif method in config_lib.LAM_FIELDS:
      if method not in methods:
        raise ValueError(
            f"--lam {value}: {method} is not among the run's methods "
            f"{list(methods)}; add it to --methods, or drop this --lam.")
      fields = [config_lib.LAM_FIELDS[method]]
    else:
      raise ValueError(
          f"--lam {value}: {method!r} has no strength; choose from "
          f"{sorted(config_lib.LAM_FIELDS)}.")
    try:
      sweep = tuple(float(v) for v in numbers.split(",") if v.strip())
    except ValueError:
      raise ValueError(f"--lam {value}: not a list of numbers.") from None
    changes.update({field: sweep for field in fields})
  return changes


def parse(argv: Sequence[str]) -> tuple[Flags, config_lib.Config]:
  """The flags and the resolved, validated configuration.

  Raises:
    ValueError, FileNotFoundError: a bad value (naming the field) or a run
      directory that cannot be resumed.
  """
  pre = argparse.ArgumentParser(add_help=False, prog=PROG)
  pre.add_argument("--preset")
  pre.add_argument("--set", action="append", default=[])
  pre.add_argument("--lam", action="append", nargs="+", default=[])
  pre.add_argument("--resume")
  known, rest = pre.parse_known_args(argv)
  if known.resume is not None:  # read here, and still a flag of Flags
    rest += ["--resume", known.resume]
  rest = [ALIASES.get(w.partition("=")[0], w.partition("=")[0])
          + w.partition("=")[1] + w.partition("=")[2] if w.startswith("--")
          else w for w in rest]
  by_set = set_to_flags(known.set)
  _check_given_once(rest, by_set)
  rest = cli.split_commas(rest + by_set, cli.list_flags(config_lib.Config))
  if known.resume is not None and known.preset is None:
    base = workdir_lib.saved_config(known.resume)
  else:
    base = config_lib.get_config(known.preset or "quick")
  flags = cli.tyro_cli(Flags, default=Flags(config=base), args=rest,
                       prog=PROG, description=__doc__)
  config = flags.config
  changes = lam_assignments(lam_words(known.lam), config.methods)
  given = _given_fields(rest)
  if (config.tasks.startswith("split_") and "num_tasks" not in given
      and config.num_tasks > tasks_lib.SPLIT_TASKS):
    # A stream of 5 tasks: the preset's longer sequence cannot be meant.
    config = dataclasses.replace(config, num_tasks=tasks_lib.SPLIT_TASKS)
  if set(changes) & given:
    raise ValueError(
        f"{sorted(set(changes) & given)} given both by --lam and by its own "
        "flag (or --set); give each strength once.")
  return flags, config_lib.validate(dataclasses.replace(config, **changes))


def _given_fields(words: Sequence[str]) -> set[str]:
  """The config fields whose flags appear in ``words``."""
  names = {f.name for f in dataclasses.fields(config_lib.Config)}
  flags = {w.partition("=")[0][2:].replace("-", "_") for w in words
           if w.startswith("--")}
  return (flags | {f[3:] for f in flags if f.startswith("no_")}) & names


def _check_given_once(flags: Sequence[str], by_set: Sequence[str]) -> None:
  """Refuses a field given both as ``--set F=...`` and as ``--f``: the
  ``--set`` one would win whatever their order. (A flag repeated in one
  spelling follows the usual rule: the last one wins.)"""
  given = _given_fields(flags)
  for word in by_set[::2]:
    field = word[2:].replace("-", "_")
    if field == "preset":
      raise ValueError("--set preset=... would only relabel the run: choose "
                       "the preset with --preset NAME.")
    if field in given:
      raise ValueError(
          f"{field} is given twice, by --set {field}=... and by "
          f"--{field.replace('_', '-')}; give it once.")


def _workdir(flags: Flags, config: config_lib.Config) -> Any:
  """The run directory, checked; a default one is created (uniquely).

  Nothing is written before the data source is checked (a bad
  ``--data-dir`` leaves no empty run directory behind); the run itself
  (:func:`experiment.train_and_evaluate`) prepares the directory under its
  lock.
  """
  if flags.resume:
    if flags.out or flags.overwrite:
      raise ValueError(
          "--resume continues RUN_DIR in place: drop --out and --overwrite.")
    if flags.vmap:
      raise ValueError("--vmap runs are not checkpointed: --resume cannot "
                       "continue them.")
    workdir_lib.check_resume(flags.resume, config)
    data_lib.check_source(config.dataset, config.data_dir)
    return flags.resume
  if flags.data_seed is not None and not flags.vmap:
    raise ValueError("--data-seed needs --vmap.")
  if flags.vmap and (config.checkpoint_every or config.keep_checkpoints):
    raise ValueError("--vmap runs are not checkpointed: drop "
                     "--checkpoint-every and --keep-checkpoints.")
  if flags.out is not None and not flags.out.strip():
    raise ValueError("--out is empty: name the run directory, or leave "
                     "--out out for a new runs/PRESET-TIME-PID.")
  data_lib.check_source(config.dataset, config.data_dir)
  if flags.out is None:
    return workdir_lib.default_workdir(config)
  workdir_lib.check_workdir(flags.out, flags.overwrite)
  return flags.out


def main(argv: Optional[Sequence[str]] = None, *,
         on_chunk: Optional[loop.ChunkHook] = None) -> int:
  """Parses flags, runs the experiment, logs the summary table.

  Args:
    argv: the arguments (default ``sys.argv[1:]``).
    on_chunk: a test hook (:func:`loop.run`); never set from the command
      line.

  Returns:
    The exit status (2 with a message on stderr for bad flags).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    flags, config = parse(argv)
    flags.output.check()  # a missing wandb fails before any work
    if flags.output.quiet:  # the results and errors only
      config = dataclasses.replace(config, progress=False)
    workdir = _workdir(flags, config)
  except BrokenPipeError:  # --help | head -1
    return CLOSED_STATUS
  except (ValueError, ImportError, OSError) as e:  # DataError: ValueError
    print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
    raise SystemExit(2) from None
  try:
    with flags.output.logging():
      return _run(flags, config, workdir, on_chunk)
  except cli.OutputClosed:  # the table of a --quiet run could not be shown
    print(f"{PROG}: standard output was closed; the results are in "
          f"{workdir}", file=sys.stderr)
    return CLOSED_STATUS


def _live(flags: Flags, workdir: Any) -> Optional[monitor.LiveMetrics]:
  live = flags.output.live()
  return None if live is None else monitor.LiveMetrics(**live,
                                                       group=str(workdir))


# Errors of the run that are the user's to fix (data, directory, memory,
# divergence, checkpoints, disk): one line on stderr, never a traceback.
RUN_ERRORS = (data_lib.DataError, loop.TrainingDiverged,
              workdir_lib.RunDirError, checkpointing.CheckpointError,
              budget.MemoryBudgetError, FileExistsError)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


# The status of a command stopped by a closed stdout: a shell's for SIGPIPE.
CLOSED_STATUS = 141


def _fail(flags: Flags, workdir: Any, message: str, status: int) -> int:
  """Prints ``message`` as one line on stderr, with where an overwritten
  run's files are kept; removes a default run directory that the failed run
  left empty (its lock file aside); returns ``status``."""
  path = pathlib.Path(workdir)
  previous = path / workdir_lib.PREVIOUS
  if previous.is_dir():
    message += f" The previous run's files are kept in {previous}."
  print(message, file=sys.stderr)
  if flags.out is None and not flags.resume and path.is_dir() and all(
      p.name == workdir_lib.LOCK for p in path.iterdir()):
    shutil.rmtree(path, ignore_errors=True)
  return status


def _run(flags: Flags, config: config_lib.Config, workdir: Any,
         on_chunk: Optional[loop.ChunkHook]) -> int:
  """Runs the experiment; 1 with one line on stderr for a run that cannot
  go on (bad data, a diverged run, a busy or full run directory), 130 when
  interrupted (Ctrl-C)."""
  # Said first, so that a run killed midway knows where to resume from.
  logger.info("run directory: %s (continue an interrupted run with "
              "--resume %s)", workdir, workdir)
  try:
    summary = experiment.train_and_evaluate(
        config, workdir, overwrite=flags.overwrite,
        resume=bool(flags.resume), vmap=flags.vmap,
        data_seed=flags.data_seed, on_chunk=on_chunk,
        live=_live(flags, workdir))
  except RUN_ERRORS as e:
    return _fail(flags, workdir, f"error: {_one_line(e)}", 1)
  except OSError as e:  # a full disk, a read-only or vanished directory
    return _fail(flags, workdir, "error: cannot write the run's files in "
                 f"{workdir}: {_one_line(e)}", 1)
  except (KeyboardInterrupt, cli.OutputClosed) as e:
    if not (pathlib.Path(workdir) / "config.json").is_file():
      again = "it had not started: nothing to resume"
    elif flags.vmap:
      again = "--vmap runs are not checkpointed: start it again"
    else:
      again = f"continue it with: {PROG} --resume {workdir}"
    if isinstance(e, KeyboardInterrupt):
      return _fail(flags, workdir,
                   f"interrupted; run directory {workdir}: {again}", 130)
    return _fail(flags, workdir, "standard output was closed: stopped; run "
                 f"directory {workdir}: {again}", CLOSED_STATUS)
  logger.info("results in %s", summary["workdir"])
  if flags.output.quiet:
    cli.print_out(results_lib.format_table(summary["methods"]))
  return 0
