"""Sphinx configuration of the documentation site.

The source directory is the repository root, so that README.md, CHANGELOG.md
and BENCHMARKS.md are pages as they are, and their links to one another and
to docs/ resolve in the site as on a code host. Build (offline; warnings are
errors):

  pip install --group docs          # pip >= 25.1
  python -m sphinx -W --keep-going -c docs . build/docs

A new page docs/NAME.md joins the site's contents by itself (a glob in
docs/index.md's toctree); jupytext scripts docs/NAME.pct.py are executed
notebooks. Links between pages are checked: a link to a missing page fails.
The API reference (docs/api.md) is generated from ``ewc_jax.__all__`` and
the ``__all__`` of every public submodule by the ``ewc-api`` directive
below: a new public name gets its entry with no edit here, and the build
fails when a public name has no entry or a public function or class no
docstring.
"""

import ast
import importlib
import inspect
import os
import pathlib
import re
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The tutorial's kernel imports ewc_jax from the checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

import ewc_jax  # noqa: E402

logger = logging.getLogger(__name__)

project = "ewc_jax"
author = "the ewc_jax authors"
copyright = "the ewc_jax authors"
version = release = ewc_jax.__version__

root_doc = "docs/index"
include_patterns = ["README.md", "CHANGELOG.md", "BENCHMARKS.md", "docs/*.md",
                    "docs/*.pct.py"]
exclude_patterns = ["docs/conf.py", "docs/pypi.md", "build", "**/_build"]

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Markdown (MyST), and jupytext percent scripts (``docs/*.pct.py``, jupytext's
# own name for them) as notebooks. Only that suffix: a link to any other .py
# file stays a link to the file.
nb_custom_formats = {".pct.py": ["jupytext.reads", {"fmt": "py:percent"}]}
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]
# Pages that open with a level-2 heading (docs/continual_lm.md) are fine.
suppress_warnings = ["myst.header"]
# The tutorial runs at every build: its outputs are never stale, and a
# failing cell fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_merge_streams = True

# The library's docstrings are Google style with reStructuredText markup.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# No intersphinx: the build reads nothing from the network.
html_theme = "sphinx_book_theme"
html_title = f"ewc_jax {release}"
html_theme_options = {"show_toc_level": 2}
html_static_path: list = []


# Public values that may appear with their value alone, no doc comment (a
# ``#:`` comment, or a comment block right above the assignment, in the module
# that defines them). Each is a debt: once it has a comment, the build asks
# for its removal here.
UNDOCUMENTED_VALUES = {"ewc_jax.ESTIMATORS"}


def _source_modules(module) -> dict:
  """Where each public name of ``module`` is imported from (its __init__)."""
  return _imports(ast.parse(inspect.getsource(module)))


def _comment_above(modname: str, name: str, depth: int = 0) -> list:
  """The ``#:`` doc comment of a module-level value, else the plain comment
  block right above its assignment; for ``NAME = OTHER`` with ``OTHER``
  imported, the comment where ``OTHER`` is defined."""
  analyzer = ModuleAnalyzer.for_module(modname)
  docs = analyzer.find_attr_docs().get(("", name))
  if docs:
    return [line for line in docs if line.strip()]
  lines = analyzer.code.splitlines()
  tree = ast.parse(analyzer.code)
  for node in tree.body:
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
      above, i = [], node.lineno - 2
      while i >= 0 and lines[i].lstrip().startswith("#"):
        above.insert(0, lines[i].lstrip()[1:].strip())
        i -= 1
      if not above and isinstance(node.value, ast.Name) and depth < 5:
        source = _imports(tree).get(node.value.id)
        if source:
          return _comment_above(source, node.value.id, depth + 1)
      return above
  return []


def _imports(tree) -> dict:
  """``{name: module}`` of a module's ``from module import name`` lines."""
  return {alias.asname or alias.name: node.module for node in tree.body
          if isinstance(node, ast.ImportFrom) and node.module
          for alias in node.names}


def public_modules(module=ewc_jax):
  """``module`` and its public submodules, as listed in ``__all__``."""
  yield module
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.ismodule(obj):
      yield from public_modules(obj)


def _module_rst(module) -> list:
  """reStructuredText for one public module: a summary table, then one entry
  per public name, grouped by the private module that defines them."""
  modname = module.__name__
  sources = _source_modules(module)
  rst = [modname, "=" * len(modname), "",
         f".. automodule:: {modname}", "", f".. currentmodule:: {modname}", ""]
  names = [n for n in module.__all__
           if not inspect.ismodule(getattr(module, n))]
  submodules = [getattr(module, n) for n in module.__all__
                if inspect.ismodule(getattr(module, n))]
  rst += _summary_rst(module, sources, names, submodules)
  groups: dict = {}
  for name in sorted(names, key=lambda n: list(sources).index(n)
                     if n in sources else len(sources)):
    src = sources.get(name, modname)
    groups.setdefault(_group(src), []).append((name, src))
  for group, entries in groups.items():
    title = _title(group)
    rst += [title, "-" * len(title), ""]
    for name, src in entries:
      rst += _entry_rst(module, src, name)
  return rst


def _group(src: str) -> str:
  """The section of a name defined in ``src``: its private package (say
  ``ewc_jax._src.kfac``) when that package has a docstring, else ``src``."""
  head, _, rest = src.partition("._src.")
  if "." in rest:
    package = f"{head}._src.{rest.split('.')[0]}"
    if inspect.getdoc(importlib.import_module(package)):
      return package
  return src


def _title(modname: str) -> str:
  """A section title from a module's docstring: its first sentence, cut at
  a colon ("Kronecker-factored EWC: curvature, ..." gives the words before
  it)."""
  doc = (inspect.getdoc(importlib.import_module(modname)) or modname)
  title = _first_sentence(doc.split("\n\n")[0].splitlines()).rstrip(".")
  return title.split(": ")[0] if ": " in title else title


def _first_sentence(lines: list) -> str:
  """Up to the first full stop that ends a sentence ("et al. 2018" goes on)."""
  text = " ".join(line.strip() for line in lines).strip()
  return re.split(r"(?<=\.)\s+(?=[A-Z])", text)[0]


def _summary_rst(module, sources: dict, names: list, submodules: list):
  """A table of every public name with its one-line summary."""
  rows = []
  for name in names:
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
      summary = (inspect.getdoc(obj) or "").split("\n\n")[0].splitlines()
    else:
      summary = (_comment_above(sources.get(name, module.__name__), name)
                 or [f"``{obj!r}``"])
    rows.append((f":py:obj:`{name}`", _first_sentence(summary)))
  for sub in submodules:
    doc = (inspect.getdoc(sub) or "").split("\n\n")[0].splitlines()
    rows.append((f":py:mod:`{sub.__name__}`", _first_sentence(doc)))
  rst = [".. list-table::", "   :widths: 30 70", ""]
  for ref, summary in rows:
    rst += [f"   * - {ref}", f"     - {summary}"]
  return rst + [""]


def _entry_rst(module, src: str, name: str) -> list:
  obj = getattr(module, name)
  full = f"{module.__name__}.{name}"
  if inspect.isclass(obj) or inspect.isfunction(obj):
    if not (inspect.getdoc(obj) or "").strip():
      logger.warning(f"{full}: a public name with no docstring",
                     type="ewc_api", subtype="undocumented")
    if inspect.isfunction(obj):
      return [f".. autofunction:: {full}", ""]
    # Fields of a NamedTuple are described by the class's Attributes section.
    fields = ", ".join(getattr(obj, "_fields", ()))
    return ([f".. autoclass:: {full}", "   :members:"]
            + ([f"   :exclude-members: {fields}"] if fields else []) + [""])
  # A value (a tuple of names, a Literal alias, a default optimiser): its
  # doc comment in the defining module, and its value when short.
  comment = _comment_above(src, name)
  if not comment and full not in UNDOCUMENTED_VALUES:
    logger.warning(f"{full}: a public value with no comment where "
                   f"{src} defines it", type="ewc_api", subtype="undocumented")
  if comment and full in UNDOCUMENTED_VALUES:
    logger.warning(f"{full} is documented now: remove it from "
                   "UNDOCUMENTED_VALUES in docs/conf.py", type="ewc_api",
                   subtype="stale")
  value = repr(obj).replace("typing.", "")
  rst = [f".. py:data:: {name}"]
  if len(value) <= 120:
    rst.append(f"   :value: {value}")
  rst.append("")
  rst += [f"   {line}" for line in comment]
  return rst + [""]


class ApiDirective(SphinxDirective):
  """``ewc-api``: the API reference of ``ewc_jax`` and its submodules.

  A reStructuredText directive: in a MyST page, put it in ``{eval-rst}``.
  """

  has_content = False

  def run(self):
    rst = []
    for module in public_modules():
      rst += _module_rst(module)
    node = nodes.section()
    node.document = self.state.document
    nested_parse_with_titles(
        self.state, StringList(rst, source="ewc_jax.__all__"), node)
    return node.children


def check_api_complete(app, env):
  """Every public name has an entry in the API reference."""
  objects = env.get_domain("py").objects
  for module in public_modules():
    for name in module.__all__:
      full = f"{module.__name__}.{name}"
      if full not in objects:
        logger.warning(f"{full} is public (in __all__) but has no entry in "
                       "the API reference", type="ewc_api", subtype="missing")


def redirect_to_index(app, exception):
  """``index.html`` at the top of the output opens ``docs/index.html``."""
  if exception is None and app.builder.format == "html":
    target = app.builder.get_target_uri(root_doc)
    page = pathlib.Path(app.outdir) / "index.html"
    page.write_text(
        f'<!DOCTYPE html><meta charset="utf-8"><title>{project}</title>'
        f'<meta http-equiv="refresh" content="0; url={target}">'
        f'<a href="{target}">{project}</a>\n')


def setup(app):
  app.add_directive("ewc-api", ApiDirective)
  app.connect("env-check-consistency", check_api_complete)
  app.connect("build-finished", redirect_to_index)
  return {"parallel_read_safe": True}
