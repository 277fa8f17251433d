"""What `pip install .` puts on a machine, and what `import ewc_jax` costs."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_ewc_jax_imports_no_experiment_dependencies():
  # A fresh interpreter: this test process has imported flax already.
  code = ("import sys, ewc_jax; heavy = ['flax', 'tensorflow_datasets', "
          "'tensorflow', 'orbax', 'matplotlib', 'mlxtend', 'scipy', "
          "'experiments', 'chex']; "
          "print([m for m in heavy if m in sys.modules])")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pip_install_puts_only_ewc_jax_with_license_and_py_typed(tmp_path):
  target = tmp_path / "site"
  # A copy of the sources, so that the build leaves nothing in the checkout.
  src = tmp_path / "src"
  listing = subprocess.run(
      ["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
       "--exclude-standard"], capture_output=True, text=True)
  if listing.returncode != 0:
    pytest.skip("not a git checkout: cannot list the sources to install.")
  files = listing.stdout.split()
  for name in files:
    if (ROOT / name).is_file():
      dest = src / name
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_bytes((ROOT / name).read_bytes())
  result = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
       "--target", str(target), str(src)],
      capture_output=True, text=True)
  if result.returncode != 0 and "etwork" in result.stderr + result.stdout:
    pytest.skip("pip could not fetch the build backend (no network): "
                + result.stderr[-300:])
  assert result.returncode == 0, result.stderr[-2000:]
  top = sorted(p.name for p in target.iterdir())
  assert top == ["ewc_jax", "ewc_jax-0.1.0.dist-info"], top
  assert (target / "ewc_jax" / "py.typed").is_file()
  info = target / "ewc_jax-0.1.0.dist-info"
  license_text = (info / "licenses" / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0" in license_text
  metadata = (info / "METADATA").read_text()
  requires = [line.split(":", 1)[1].strip()
              for line in metadata.splitlines()
              if line.startswith("Requires-Dist:") and "extra ==" not in line]
  # The library needs jax, optax and numpy only, and caps none of them.
  assert sorted(r.split(">")[0] for r in requires) == [
      "jax", "numpy", "optax"], requires
  assert not any("<" in r for r in requires), requires
  assert "Provides-Extra: experiments" in metadata
  assert "Provides-Extra: test" in metadata
