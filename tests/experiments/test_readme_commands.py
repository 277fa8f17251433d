"""Every shell line in the repository's Markdown runs as pasted.

The rules, for whoever writes a shell block in README.md, CHANGELOG.md,
BENCHMARKS.md or docs/**.md (this test reads every one of them):

1. Every line of a ```bash, ```sh or ```shell block is shell, pasted into a
   terminal at the repository root. A line ending in a backslash goes on to
   the next; ``#`` starts a comment. Output, prompts (``$ ...``) and prose go
   in a ```text block (or any other language), never in a shell block; so do
   here-documents.
2. Each command parses (``bash -n``). Write a placeholder as a plain word in
   capitals (``DIR``, ``RUN_DIR``, ``HOST0:1234``, ``N``), never ``<dir>``,
   which the shell reads as a redirection.
3. Every program a command starts is one the reader has: each stage of a
   pipeline and each command after ``&&``, ``||`` or ``;`` (past leading
   ``VAR=value`` assignments) is on PATH, a shell builtin or keyword, or in
   ``EXTERNAL_PROGRAMS`` below (programs the docs tell the reader to install).
   Alternatives written ``--tasks a|b`` fail here: the shell pipes into a
   program ``b``.
4. ``python -m MODULE ...`` with a module of this repository (``experiments``
   or ``ewc_jax``): ``python -m MODULE --help`` exits 0, and every long flag
   (``--name``) of the command appears in that help. One subprocess per
   module, whatever the number of its commands. Other modules (``pytest``,
   ``sphinx``, ``mypy``) are not run.
5. A path argument in one of the repository's folders (``tests/``,
   ``experiments/``, ``ewc_jax/``, ``docs/``, ``.ci/``) exists. Output paths
   elsewhere (``runs/...``, ``build/...``) are not checked.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKDOWN = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("**/*.md")])
SHELL_FENCES = ("bash", "sh", "shell")
REPO_PACKAGES = ("experiments", "ewc_jax")
REPO_FOLDERS = ("tests", "experiments", "ewc_jax", "docs", ".ci")
# Programs that the docs ask the reader to install before the command.
EXTERNAL_PROGRAMS = {"tensorboard", "srun", "mpirun"}
BUILTINS = {
    ".", ":", "[", "alias", "cd", "command", "echo", "eval", "exec", "exit",
    "export", "false", "printf", "pwd", "read", "set", "source", "test",
    "time", "trap", "true", "type", "ulimit", "umask", "unset", "wait",
    # keywords that can start a command
    "!", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if",
    "then", "until", "while", "{", "}"}
OPERATORS = {"|", "||", "&&", ";", "&", "|&", "(", ")", ";;"}
PYTHON = re.compile(r"python(3(\.\d+)?)?$")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Command:
  """One logical shell line (continuations joined) and where it was written."""
  path: pathlib.Path
  line: int
  text: str

  def where(self) -> str:
    return f"{self.path.relative_to(ROOT)}:{self.line}"


def shell_commands(path: pathlib.Path) -> list:
  """The commands of every shell block of one Markdown file."""
  commands, fence, pending, start = [], None, "", 0
  for number, line in enumerate(path.read_text().splitlines(), 1):
    stripped = line.strip()
    if fence is None:
      if stripped.startswith("```"):
        fence = stripped[3:].strip().split(" ")[0].strip("{}")
      continue
    if stripped.startswith("```"):
      fence = None
      continue
    if fence not in SHELL_FENCES:
      continue
    if not pending:
      start = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    text = (pending + line).strip()
    pending = ""
    if text and not text.startswith("#"):
      commands.append(Command(path, start, text))
  return commands


COMMANDS = [c for path in MARKDOWN for c in shell_commands(path)]


def _without_substitutions(text: str) -> str:
  """``$(...)`` and backquoted parts replaced by a word (not looked into)."""
  out, i = [], 0
  while i < len(text):
    if text.startswith("$(", i):
      depth, i = 1, i + 2
      while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
      out.append("SUBSTITUTION")
    elif text[i] == "`":
      i = text.find("`", i + 1) + 1 or len(text)
      out.append("SUBSTITUTION")
    else:
      out.append(text[i])
      i += 1
  return "".join(out)


def simple_commands(text: str) -> list:
  """The words of each simple command (split at pipes and control
  operators), comments dropped."""
  lexer = shlex.shlex(_without_substitutions(text), posix=True,
                      punctuation_chars=True)
  lexer.commenters = ""
  lexer.whitespace_split = True
  commands, words = [], []
  for token in lexer:
    if token.startswith("#"):
      break
    if token in OPERATORS or set(token) <= set("|&;()"):
      if words:
        commands.append(words)
      words = []
    else:
      words.append(token)
  if words:
    commands.append(words)
  return commands


def program_and_args(words: list) -> tuple:
  """Drops leading ``VAR=value`` assignments."""
  i = 0
  while i < len(words) and ASSIGNMENT.match(words[i]):
    i += 1
  return (words[i], words[i + 1:]) if i < len(words) else (None, [])


def python_module(words: list):
  """``(module, args)`` of ``python -m module args``, else None."""
  program, args = program_and_args(words)
  if program and PYTHON.match(program) and len(args) >= 2 and (
      args[0] == "-m"):
    return args[1], args[2:]
  return None


def test_the_docs_have_shell_commands_to_check():
  # Guards the extractor: the README's first block alone has two commands.
  readme = [c for c in COMMANDS if c.path.name == "README.md"]
  assert len(readme) >= 2, readme
  assert any(python_module(w) for c in readme
             for w in simple_commands(c.text)), readme


def test_extractor_and_rules_on_known_lines(tmp_path):
  # The rules' own tests: what a shell would do with each line.
  doc = tmp_path / "doc.md"
  doc.write_text("text\n```bash\nA=1 python -m x --f 1 \\\n    --g 2  # c\n"
                 "# a comment\n```\n```text\nnot shell\n```\n"
                 "```sh\ncd DIR && pip install .\n```\n")
  commands = shell_commands(doc)
  assert [(c.line, c.text) for c in commands] == [
      (3, "A=1 python -m x --f 1      --g 2  # c"),
      (11, "cd DIR && pip install .")]
  assert simple_commands(commands[0].text) == [
      ["A=1", "python", "-m", "x", "--f", "1", "--g", "2"]]
  assert python_module(simple_commands(commands[0].text)[0]) == (
      "x", ["--f", "1", "--g", "2"])
  assert simple_commands(commands[1].text) == [["cd", "DIR"],
                                               ["pip", "install", "."]]
  # The line: alternatives with | are a pipeline into `b` and `c`.
  assert simple_commands("python -m m --tasks a|b|c --model cnn") == [
      ["python", "-m", "m", "--tasks", "a"], ["b"], ["c", "--model", "cnn"]]
  assert simple_commands('x --d "$(dirname "$(f | g)")" | head -1') == [
      ["x", "--d", "SUBSTITUTION"], ["head", "-1"]]
  assert not _parses("python -m m --data-dir <dir>")
  assert _parses("python -m m --data-dir DIR")


def _parses(text: str) -> bool:
  return subprocess.run(["bash", "-n"], input=text, text=True,
                        capture_output=True).returncode == 0


def _problems(command: Command) -> list:
  if not _parses(command.text):
    error = subprocess.run(["bash", "-n"], input=command.text, text=True,
                           capture_output=True).stderr.strip()
    return [f"does not parse: {error}"]
  problems = []
  for words in simple_commands(command.text):
    program, args = program_and_args(words)
    if program is None:
      continue
    if not (program in BUILTINS or program in EXTERNAL_PROGRAMS
            or shutil.which(program)):
      problems.append(f"runs {program!r}, which is no program on PATH, no "
                      "builtin and not in EXTERNAL_PROGRAMS")
    for arg in args:
      value = arg.partition("=")[2] if arg.startswith("-") else arg
      top = value.split("/", 1)[0]
      if (top in REPO_FOLDERS and not set(value) & set("*?[")
          and not (ROOT / value).exists()):
        problems.append(f"names {value}, which does not exist")
  return problems


@pytest.mark.parametrize("path", MARKDOWN,
                         ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_shell_lines_parse_and_run_programs_that_exist(path):
  problems = [f"{c.where()}: {c.text}\n    {p}"
              for c in COMMANDS if c.path == path for p in _problems(c)]
  assert not problems, "\n".join(problems)


def _repo_modules() -> dict:
  """Each repository module run with ``python -m``, and its commands."""
  modules: dict = {}
  for command in COMMANDS:
    for words in simple_commands(command.text):
      found = python_module(words)
      if found and found[0].split(".")[0] in REPO_PACKAGES:
        modules.setdefault(found[0], []).append((command, found[1]))
  return modules


REPO_MODULES = _repo_modules()


@pytest.mark.parametrize("module", sorted(REPO_MODULES))
def test_python_m_help_exits_0_and_lists_every_flag_used(module):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             COLUMNS="200")
  result = subprocess.run([sys.executable, "-m", module, "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, (
      f"python -m {module} --help exited {result.returncode}:\n"
      + result.stderr[-2000:])
  text = result.stdout + result.stderr
  missing = []
  for command, args in REPO_MODULES[module]:
    for arg in args:
      flag = arg.split("=", 1)[0]
      if re.fullmatch(r"--[A-Za-z][\w-]*", flag) and not re.search(
          rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
        missing.append(f"{command.where()}: {flag}")
  assert not missing, (f"flags that `python -m {module} --help` does not "
                       "list:\n" + "\n".join(missing))
