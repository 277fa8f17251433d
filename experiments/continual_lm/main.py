"""Command line of the continual LM experiment.

Examples:
  python -m experiments.continual_lm                  # cpu preset, ~3 min
  python -m experiments.continual_lm --lam 1 10 100 --out runs/lm-sweep
  python -m experiments.continual_lm --dtype bfloat16
  python -m experiments.continual_lm --preset gpu     # tens of MB of text
  python -m experiments.continual_lm --corpus-a a.txt --corpus-b b.txt

``--preset {cpu,gpu,tiny}`` picks the defaults (see ``config.PRESETS``),
``--out DIR`` the output directory (default runs/continual_lm); every other
flag sets one field of the config. The run writes ``results.json``,
``results.md`` and ``perplexity.png`` there. Measured results:
docs/continual_lm.md.
"""

import argparse
import pathlib
import sys
from typing import Optional, Sequence

import tyro

from experiments.continual_lm import experiment
from experiments.continual_lm import results as results_lib
from experiments.continual_lm.config import PRESETS
from experiments.continual_lm.config import Config
from experiments.continual_lm.config import validate


def parse(argv: Optional[Sequence[str]] = None) -> tuple[Config, pathlib.Path]:
  """The config (preset plus flags) and the output directory.

  Raises:
    SystemExit: bad flags (tyro prints why), or ``--help``.
  """
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  pre.add_argument("--out", default="runs/continual_lm")
  known, rest = pre.parse_known_args(argv)
  config = tyro.cli(Config, default=PRESETS[known.preset], args=rest,
                    prog="python -m experiments.continual_lm",
                    description=__doc__)
  return config, pathlib.Path(known.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the experiment; 2 (with one line on stderr) for bad settings."""
  try:
    config, out = parse(argv)
  except SystemExit as e:  # tyro has printed why (or the help).
    return e.code if isinstance(e.code, int) else 2
  try:
    validate(config)
    experiment.load_data(config)  # Bad corpora fail before any training.
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = experiment.run(config)
  results_lib.write_outputs(results, out)
  print(results_lib.results_table(results))
  print(f"total {results['seconds']:.0f} s; wrote {out / 'results.json'}, "
        f"{out / 'results.md'}, {out / 'perplexity.png'}")
  return 0
