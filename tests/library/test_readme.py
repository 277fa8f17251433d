"""The README's library example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "no python block in the README"
  exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == ["task 0", "task 1",
                                                      "task 2"]
  # After consolidation the penalty at the anchor is zero, and it grows as
  # later tasks pull the weights away.
  penalties = [float(line.rsplit(" ", 1)[1]) for line in lines]
  assert penalties[0] == 0.0 and penalties[2] > 0.0


def test_readme_language_model_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  lm = [b for b in blocks if "nnx.Optimizer" in b]
  assert len(lm) == 1, "the README's nnx.Optimizer example"
  exec(compile(lm[0], "README.md", "exec"), {})  # noqa: S102
  lines = capsys.readouterr().out.splitlines()
  # One task consolidated after each: the state holds 1, 2, 3 tasks.
  assert [line.rsplit(" ", 1)[1] for line in lines] == ["1", "2", "3"]
