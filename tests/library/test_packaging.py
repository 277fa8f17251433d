"""What `pip install .` puts on a machine, and what `import ewc_jax` costs;
the version, the changelog and the package index's page."""

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import ewc_jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PYPI_PAGE = ROOT / PYPROJECT["project"]["readme"]


def _python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_one_version_in_pyproject_package_and_changelog():
  assert ewc_jax.__version__ == VERSION
  assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION
  changelog = (ROOT / "CHANGELOG.md").read_text()
  # Keep a Changelog: "## [X.Y.Z] - YYYY-MM-DD", newest first, and an
  # Unreleased section above them.
  releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d\d-\d\d$",
                        changelog, re.M)
  assert releases and releases[0] == VERSION, releases
  assert releases == sorted(releases, reverse=True,
                            key=lambda v: tuple(map(int, v.split("."))))
  assert changelog.index("## [Unreleased]") < changelog.index(
      f"## [{VERSION}]")


def test_package_index_page_opens_with_install_then_the_readme_example():
  text = PYPI_PAGE.read_text()
  headings = re.findall(r"^## (.+)$", text, re.M)
  assert headings[:2] == ["Install", "Example"], headings
  install = text.split("## Install", 1)[1].split("## ", 1)[0]
  assert 'pip install "ewc_jax[examples]"' in install
  # The example is the README's, character for character: test_readme runs
  # that one.
  assert _python_blocks(PYPI_PAGE) == _python_blocks(ROOT / "README.md")[:1]
  # Nothing that works only in a checkout, and no link a package index
  # cannot follow (relative links resolve against the index, not the repo).
  for checkout_only in ("requirements.txt", "python -m experiments",
                        "pip install -e", 'pip install "."', "pip install ."):
    assert checkout_only not in text, checkout_only
  links = re.findall(r"\]\(([^)]+)\)", text)
  assert links and all(link.startswith("https://") for link in links), links


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
  assert top == ["ewc_jax", f"ewc_jax-{VERSION}.dist-info"], top
  assert (target / "ewc_jax" / "py.typed").is_file()
  info = target / f"ewc_jax-{VERSION}.dist-info"
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
  # The README example's extra brings Flax; the checkout's tool groups (docs,
  # typecheck) are not published as extras.
  assert "Provides-Extra: examples" in metadata
  examples = [line for line in metadata.splitlines()
              if line.startswith("Requires-Dist:") and "extra ==" in line
              and "examples" in line.split("extra ==", 1)[1]]
  assert any(line.split(":", 1)[1].strip().startswith("flax")
             for line in examples), examples
  extras = re.findall(r"^Provides-Extra: (.+)$", metadata, re.M)
  assert not {"docs", "typecheck"} & set(extras), extras
  # The long description is the package index page, as Markdown.
  assert "Description-Content-Type: text/markdown" in metadata
  header, _, body = metadata.partition("\n\n")
  assert body.strip() == PYPI_PAGE.read_text().strip()
