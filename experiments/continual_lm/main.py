"""Command line of the continual LM experiment (Qwen3 on tunix).

Examples:
  python -m experiments.continual_lm                  # offline, ~7 min CPU
  python -m experiments.continual_lm --model-dir ~/Qwen3-0.6B --preset gpu \\
      --dtype bfloat16 --out runs/qwen3-0.6b         # a user's checkpoint
  python -m experiments.continual_lm --model-dir DIR --mesh 4x2  # 8 devices
  python -m experiments.continual_lm --lam 1,10,100 --out runs/lm-sweep
  python -m experiments.continual_lm --corpus-a a.txt --corpus-b b.txt
  python -m experiments.continual_lm --logdir runs/tb # tensorboard --logdir
  python -m experiments.continual_lm --out runs/continual_lm --resume

Needs the LM extra: ``pip install --no-deps -r requirements-lm.txt``.
``--preset {cpu,gpu,tiny}`` picks the defaults (see ``config.PRESETS``);
every field of the config is a flag; lists take commas or spaces. The run
directory ``--out`` (default runs/continual_lm) keeps every finished phase
(``state.json``, ``pretrained/``, ``fisher/``, ``finetuned/``), so a run
stopped by Ctrl-C or a crash continues with ``--resume``; at the end it
holds ``results.json``, ``results.md`` and ``perplexity.png``. Measured
results: docs/continual_lm.md.
"""

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Annotated, Optional, Sequence

import tyro

from experiments.common import cli
from experiments.continual_lm import results as results_lib
from experiments.continual_lm.config import PRESETS
from experiments.continual_lm.config import Config
from experiments.continual_lm.config import validate

logger = logging.getLogger("experiments.continual_lm")
PROG = "python -m experiments.continual_lm"
INSTALL = "pip install --no-deps -r requirements-lm.txt"


@dataclasses.dataclass(frozen=True)
class Flags:
  """The command line: the configuration's fields and where results go.

  Attributes:
    config: every field of the experiment's configuration.
    out: the run directory.
    overwrite: replace the run a previous attempt left in --out.
    resume: continue the run in --out (same flags), keeping its phases.
    output: messages and live metrics (--quiet, --logdir, --wandb, ...).
  """

  config: Annotated[Config, tyro.conf.arg(name="")]
  out: str = "runs/continual_lm"
  overwrite: bool = False
  resume: bool = False
  output: Annotated[cli.OutputFlags, tyro.conf.arg(name="")] = (
      cli.OutputFlags())


def parse(argv: Optional[Sequence[str]] = None) -> Flags:
  """The flags, the config from the preset plus flags.

  Raises:
    SystemExit: bad flags (tyro prints why), or ``--help``.
  """
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  known, rest = pre.parse_known_args(argv)
  rest = cli.split_commas(rest, cli.list_flags(Config) + ["--lam"])
  return tyro.cli(Flags, default=Flags(config=PRESETS[known.preset]),
                  args=rest, prog=PROG, description=__doc__)


def _import_experiment():
  """The experiment module, or an ImportError naming the install line."""
  try:
    from experiments.continual_lm import experiment  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
        f"the LM experiment needs tunix's Qwen3, qwix, safetensors and "
        f"tokenizers ({e}); install them with: {INSTALL}") from None
  return experiment


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the experiment; 2 (one line on stderr) for bad settings, 1 for a
  run that diverged or could not write, 130 when interrupted."""
  try:
    flags = parse(argv)
  except SystemExit as e:  # tyro has printed why (or the help).
    return e.code if isinstance(e.code, int) else 2
  out = pathlib.Path(flags.out)
  config = flags.config
  try:
    validate(config)
    flags.output.check()
    results_lib.check_out(flags.out, flags.overwrite, flags.resume)
    experiment = _import_experiment()
    from experiments.continual_lm import family  # noqa: PLC0415
    from experiments.continual_lm import hf_config  # noqa: PLC0415
    from experiments.continual_lm import sequences  # noqa: PLC0415
    from experiments.continual_lm import workdir  # noqa: PLC0415
    if config.model_dir is not None:
      model_config, hf = hf_config.read_config(config.model_dir,
                                               dtype=config.dtype)
      family.check_tensors(config.model_dir, model_config)
      longest = hf.get("max_position_embeddings")
      if isinstance(longest, int) and config.seq_len > longest:
        raise ValueError(
            f"--seq-len {config.seq_len}: the model would read more "
            f"positions than the checkpoint's max_position_embeddings "
            f"{longest}.")
    family.make_mesh(config.mesh)
    sequences.load_texts(config)  # bad corpora fail before any training
  except (ValueError, ImportError, OSError) as e:
    print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  live = flags.output.live()
  live = None if live is None else experiment.LiveMetrics(**live)
  with flags.output.logging():
    try:
      if flags.overwrite:
        workdir.remove_outputs(out)
      results = experiment.run(config, out, live=live, resume=flags.resume,
                               show_progress=None if not flags.output.quiet
                               else False)
      results_lib.write_outputs(results, out)
    except KeyboardInterrupt:
      print(f"{PROG}: interrupted; the finished phases are kept in {out}: "
            "continue with the same flags and --resume", file=sys.stderr)
      return 130
    except experiment.RunDiverged as e:
      print(f"{PROG}: error: {_one_line(e)}; the finished runs are kept in "
            f"{out / 'state.json'} and no results were written: lower "
            "--lr (or --lora-lr) and run again", file=sys.stderr)
      return 1
    except (ValueError, hf_config.CheckpointError) as e:
      print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
      return 2
    except OSError as e:
      print(f"{PROG}: error: cannot write in {out}: {_one_line(e)}",
            file=sys.stderr)
      return 1
    logger.info("%s", results_lib.results_table(results))
    logger.info("total %.0f s; wrote %s, %s, %s", results["seconds"],
                out / "results.json", out / "results.md",
                out / "perplexity.png")
  return 0
