"""Command line of the continual LM experiment.

Examples:
  python -m experiments.continual_lm                  # cpu preset, ~3 min
  python -m experiments.continual_lm --lam 1,10,100 --out runs/lm-sweep
  python -m experiments.continual_lm --dtype bfloat16
  python -m experiments.continual_lm --preset gpu     # tens of MB of text
  python -m experiments.continual_lm --corpus-a a.txt --corpus-b b.txt
  python -m experiments.continual_lm --logdir runs/tb # tensorboard --logdir

``--preset {cpu,gpu,tiny}`` picks the defaults (see ``config.PRESETS``);
every field of the config is a flag; lists take commas or spaces. The run
writes ``results.json``, ``results.md`` and ``perplexity.png`` to ``--out``
(default runs/continual_lm); a directory holding a previous run's results
needs ``--overwrite``. Measured results: docs/continual_lm.md.
"""

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Annotated, Optional, Sequence

import tyro

from experiments.common import cli
from experiments.continual_lm import experiment
from experiments.continual_lm import results as results_lib
from experiments.continual_lm.config import PRESETS
from experiments.continual_lm.config import Config
from experiments.continual_lm.config import validate

logger = logging.getLogger("experiments.continual_lm")
PROG = "python -m experiments.continual_lm"


@dataclasses.dataclass(frozen=True)
class Flags:
  """The command line: the configuration's fields and where results go.

  Attributes:
    config: every field of the experiment's configuration.
    out: output directory.
    overwrite: replace the results a previous run left in --out.
    output: messages and live metrics (--quiet, --logdir, --wandb, ...).
  """

  config: Annotated[Config, tyro.conf.arg(name="")]
  out: str = "runs/continual_lm"
  overwrite: bool = False
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the experiment; 2 (with one line on stderr) for bad settings."""
  try:
    flags = parse(argv)
  except SystemExit as e:  # tyro has printed why (or the help).
    return e.code if isinstance(e.code, int) else 2
  out = pathlib.Path(flags.out)
  try:
    validate(flags.config)
    flags.output.check()
    results_lib.check_out(flags.out, flags.overwrite)  # written at the end
    experiment.load_data(flags.config)  # bad corpora fail before training
  except (ValueError, ImportError, OSError) as e:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  live = flags.output.live()
  live = None if live is None else experiment.LiveMetrics(**live)
  with flags.output.logging():
    try:
      results = experiment.run(flags.config, live=live)
      results_lib.write_outputs(results, out)
    except KeyboardInterrupt:
      print(f"interrupted; nothing written to {out} (this experiment does "
            "not resume: run it again)", file=sys.stderr)
      return 130
    except OSError as e:
      print(f"error: cannot write the results in {out}: "
            f"{' '.join(str(e).split())}", file=sys.stderr)
      return 1
    logger.info("%s", results_lib.results_table(results))
    logger.info("seconds per phase: %s", ", ".join(
        f"{name} {value:.1f}" for name, value in results["timing"].items()
        if value))
    logger.info("total %.0f s; wrote %s, %s, %s", results["seconds"],
                out / "results.json", out / "results.md",
                out / "perplexity.png")
  return 0
