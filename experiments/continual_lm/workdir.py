"""The run directory: what each finished phase leaves for a resume."""

import dataclasses
import io
import json
import pathlib
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import files
from experiments.continual_lm.config import Config

STATE = "state.json"


class RunDir:
  """The run directory: what each finished phase leaves for a resume."""

  def __init__(self, out: pathlib.Path, config: Config):
    self.out = pathlib.Path(out)
    self.config = config
    self.state = {"config": dataclasses.asdict(config), "pretrain": None,
                  "fisher": {}, "runs": [], "chosen": None}

  @property
  def pretrained(self) -> pathlib.Path:
    return self.out / "pretrained"

  @property
  def finetuned(self) -> pathlib.Path:
    return self.out / "finetuned"

  def load(self) -> None:
    """Reads ``state.json`` of a previous attempt (``--resume``).

    Raises:
      ValueError: no state there, or one of another configuration.
    """
    path = self.out / STATE
    try:
      state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"--resume: {path} is not a run's state ({e}); run "
                       "without --resume.") from None
    mine = json.loads(json.dumps(dataclasses.asdict(self.config)))
    if state.get("config") != mine:
      diff = sorted(k for k in mine if state.get("config", {}).get(k)
                    != mine[k])
      raise ValueError(f"--resume: {self.out} holds a run of another "
                       f"configuration (differs in: {', '.join(diff)}); "
                       "use its flags, or another --out.")
    self.state = state

  def save(self) -> None:
    self.out.mkdir(parents=True, exist_ok=True)
    files.write_json(self.out / STATE, self.state)

  def fisher_path(self, name: str) -> pathlib.Path:
    return self.out / "fisher" / f"{name}.npz"

  def save_tree(self, name: str, tree: Any) -> None:
    path = self.fisher_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(x) for x in jax.tree.leaves(tree)])
    files.write_atomic(path, buf.getvalue())

  def load_tree(self, name: str, like: Any) -> Optional[Any]:
    path = self.fisher_path(name)
    if not path.is_file():
      return None
    with np.load(path) as z:
      leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    treedef = jax.tree.structure(like)
    if len(leaves) != treedef.num_leaves:
      return None
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])


def remove_outputs(out: pathlib.Path) -> None:
  """Deletes a previous run's files from ``out`` (``--overwrite``)."""
  for name in ("pretrained", "finetuned", "fisher"):
    shutil.rmtree(out / name, ignore_errors=True)
  for name in (STATE, "tokenizer.json", "results.json", "results.md",
               "perplexity.png"):
    (out / name).unlink(missing_ok=True)
