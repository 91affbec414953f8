"""Command line: ``nucflow demo | synth | run | measure | plan | status``.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the thing and the fix);
1 unexpected failure (a traceback only with ``--debug``). ``nucflow status`` says the run's state
in its exit code: 0 complete, 3 running, 1 failed, interrupted or stopped (2 as above: not a
nucflow output).

Here: the entry point and the exit codes; ``parser`` (the arguments), ``commands`` (run, measure,
tune, plan, status, view), ``demo`` (synth, demo).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from nucflow.cli.commands import _measure, _plan, _run, _status, _tune, _view
from nucflow.cli.demo import _demo, _synth
from nucflow.cli.parser import _parser
from nucflow.errors import (
    NucflowError,
    NucflowWarning,
    Terminated,
    environment_message,
)

__all__ = ["main", "console"]


def _one_malloc_arena() -> None:
    """Have glibc serve every thread from one heap (unless MALLOC_ARENA_MAX says otherwise).

    By default each worker thread gets heaps of its own, and the block-sized arrays freed in
    them stay mapped: on ``benchmarks/memory.py`` peak RSS fell from 938 to 623 MiB with one
    arena, at the same speed (numpy kernels, not allocations, take the time).
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


_M_ARENA_MAX = -8  # glibc malloc.h


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nucflow`` console script."""
    args = _parser().parse_args(argv)
    handler = {
        "demo": _demo,
        "synth": _synth,
        "run": _run,
        "measure": _measure,
        "plan": _plan,
        "tune": _tune,
        "status": _status,
        "view": _view,
    }[args.command]
    _one_malloc_arena()
    previous = _sigterm_raises()
    try:
        with warnings.catch_warnings():
            _show_warnings(debug=bool(getattr(args, "debug", False)))
            code = handler(args)
    except NucflowError as error:
        if args.debug:
            raise
        print(f"nucflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): run.json says so
        name = "SIGTERM" if isinstance(stop, Terminated) else "SIGINT"
        print(f"nucflow {args.command}: interrupted ({name})", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # `nucflow status OUT | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter closes it)
        return 0
    except Exception as error:  # an unexpected failure, reported without a traceback unless --debug
        if args.debug:
            raise
        # The machine's (read-only, full, forbidden), not a bug: said as such.
        if message := environment_message(error, getattr(args, "output", None)):
            print(f"nucflow {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(
            f"nucflow {args.command}: unexpected error: {type(error).__name__}: {error} "
            "(rerun with --debug for a traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code or 0


def _sigterm_raises() -> Any:
    """Make SIGTERM (``kill``, SLURM's end of walltime) raise :class:`Terminated` in the main
    thread, so a run records itself as interrupted; returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    return signal.signal(signal.SIGTERM, terminate)


def console() -> NoReturn:
    """The ``nucflow`` command: :func:`main`, then an exit without the interpreter's teardown.

    When ``main`` returns, every output is written and closed and every cluster is shut down;
    freeing the objects of the ~1600 modules a run imports would still add ~0.35 s to each
    command. Threads are joined and the libraries' exit handlers run as usual; then
    :func:`_skip_teardown`, registered before them, ends the process with ``main``'s code.
    """
    global _EXIT_CODE
    _EXIT_CODE = main()
    sys.exit(_EXIT_CODE)


_EXIT_CODE: int | None = None  # set once main returned (not on an uncaught exception)


def _skip_teardown() -> None:
    if _EXIT_CODE is None:  # not the console command, or it failed with a traceback
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_CODE)


atexit.register(_skip_teardown)  # at import, so it runs after every handler registered later


def _show_warnings(*, debug: bool) -> None:
    """nucflow's own warnings (:class:`NucflowWarning`) as one ``nucflow: warning:`` line each;
    other libraries' (pydantic deprecations under napari, ...) are theirs to fix, not the
    user's: hidden, or with ``--debug`` shown as Python shows them (category, file, line)."""
    warnings.simplefilter("default" if debug else "ignore")
    warnings.simplefilter("default", NucflowWarning)
    warnings.formatwarning = _one_line_warning


_PYTHON_FORMAT = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, NucflowWarning):
        return f"nucflow: warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)
