"""Runs mypy on ewc_jax/ (config: pyproject.toml) against the known errors.

Fails on any error not in .ci/mypy_known_errors.txt. The list holds the
errors the library had when the type check joined CI, as
``FILE: MESSAGE  [CODE]`` without line numbers (so edits elsewhere in a file
do not move them); it may only shrink: an entry that no longer occurs is
reported, to be deleted. Usage: python .ci/mypy_check.py
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
KNOWN = ROOT / ".ci" / "mypy_known_errors.txt"
ERROR = re.compile(r"^(?P<file>[^:]+):\d+:(?:\d+:)? error: (?P<rest>.*)$")


def main() -> int:
  result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT,
                          capture_output=True, text=True)
  if result.returncode not in (0, 1):  # 2: mypy itself failed
    print(result.stdout + result.stderr, file=sys.stderr)
    return result.returncode
  found = [ERROR.match(line) for line in result.stdout.splitlines()]
  errors = [f"{m['file']}: {m['rest']}" for m in found if m]
  known = [line for line in KNOWN.read_text().splitlines()
           if line.strip() and not line.startswith("#")]
  new = [e for e in errors if e not in known]
  fixed = [k for k in known if k not in errors]
  print(f"mypy: {len(errors)} errors, {len(errors) - len(new)} of them known "
        f"(.ci/mypy_known_errors.txt, {len(known)} entries).")
  for entry in fixed:
    print(f"mypy: fixed, delete from {KNOWN.name}: {entry}")
  if new:
    print("mypy: new errors:", file=sys.stderr)
    for line in result.stdout.splitlines():
      m = ERROR.match(line)
      if m and f"{m['file']}: {m['rest']}" in new:
        print(f"  {line}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
