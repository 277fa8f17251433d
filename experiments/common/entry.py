"""``python -m`` entry points: Ctrl-C at any moment is one line, status 130.

Imports nothing heavy, so that an interrupt while JAX or TensorFlow is still
being imported is caught too.
"""

import importlib
import os
import signal
import sys
import threading
from typing import NoReturn


class OutputClosed(Exception):
  """Standard output was closed while the command wrote to it (a pipe
  whose reader ended, e.g. ``| head -1``); raised by the experiments'
  logging handler (:mod:`experiments.common.cli`)."""


def _redeliver_swallowed_interrupts() -> None:
  """A Ctrl-C that lands in a callback whose exceptions Python cannot raise
  (a garbage-collection or weakref callback, a ``__del__``: JAX and the
  standard library have such) would be printed as "Exception ignored" and
  lost, the program going on; it is raised again a moment later instead."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
      threading.Timer(0.01, signal.raise_signal, (signal.SIGINT,)).start()
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _stdout_closed() -> bool:
  """Flushes stdout; when its reader has gone (``| head``), points it at
  ``os.devnull`` so that the interpreter's own final flush stays silent
  (no "Exception ignored ... BrokenPipeError"), and says so."""
  try:
    sys.stdout.flush()
    return False
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return True
  except (OSError, ValueError):  # closed or not a file: nothing to flush
    return False


def run(module: str, prog: str) -> NoReturn:
  """Imports ``module`` and exits with the status of its ``main()``.

  An interrupt (Ctrl-C) anywhere prints one line and exits with status 130:
  while the modules are imported it is held back until they are (an
  extension module interrupted in its initialisation fails with an
  ImportError and a traceback), then reported; ``main`` itself reports an
  interrupted run (and where to resume it) and returns 130. The process
  then ends with ``os._exit`` once the standard streams are flushed: a
  normal interpreter teardown can crash (SIGSEGV) when the interrupt came
  while XLA was compiling in a background thread, which outlives the Python
  objects it uses. Every file of the run is written (atomically) before
  ``main`` returns. A closed stdout (``| head -1``) ends quietly too: ``main``
  reports it and returns 141 (a shell's status for SIGPIPE), and output
  still buffered for the closed pipe is dropped without a traceback.

  Args:
    module: the module that holds ``main() -> int``.
    prog: the command's name, for the message.
  """
  _redeliver_swallowed_interrupts()
  signal.signal(signal.SIGINT, signal.default_int_handler)
  mask = getattr(signal, "pthread_sigmask", None)  # POSIX only
  try:
    if mask is not None:
      mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
      main = importlib.import_module(module).main
    finally:
      if mask is not None:
        mask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one: raised
    try:
      status = main()
    except SystemExit as e:  # --help, or bad flags (2)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      status = e.code if isinstance(e.code, int) else int(e.code is not None)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    status = 130
  except OutputClosed:  # a command that does not report it itself
    print(f"{prog}: standard output was closed: stopped", file=sys.stderr)
    status = 141
  _stdout_closed()
  if status in (130, 141):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  # The work is done: a Ctrl-C during the interpreter's teardown would only
  # replace the real status with death by SIGINT.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  sys.exit(status)
