"""What a command prints on the terminal, and where everything else goes.

The terminal shows what a user reads: progress lines and results (printed to
stdout by the trainer, the evaluators and the tools), warnings of this project's
own modules, errors, and for a run killed by an exception one line naming the
cause. Everything else (INFO lines of absl, orbax, TensorFlow and JAX, Python
deprecation warnings, and what C++ libraries write to file descriptor 2: XLA,
oneDNN, TensorFlow) goes to a log file with timestamps, ``WORKDIR/log.txt``
(``WORKDIR/log.<i>.txt`` for process i > 0 of a multi-process run).

`start` is called by an entry point before anything heavy runs; until the
command knows (and has validated) its folder, the log is a temporary file, and
`attach` moves it into that folder: a run that stops on a bad config leaves
its workdir untouched. With ``verbose`` everything is shown on the terminal as
well (nothing is redirected). A workdir given as a URL (``gs://...``) gets the
log copied in when the command ends. `fatal` writes an exception's traceback to
the log and its one-line cause to the terminal.

Not here: what the progress lines say (the trainer and the tools print them).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
import warnings
from typing import TextIO

from deepcoro_jax import paths

LOG_FILE = "log.txt"
MAX_CAUSE = 2000  # characters of an error's message on its one terminal line
# Loggers whose warnings reach the terminal: the project's own (the trainer logs
# through the root logger).
OWN_LOGGERS = ("root", "__main__", "launch", "deepcoro_jax", "input_pipeline", "evaluators")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    terminal: TextIO | None = None  # the original stderr, while fd 2 goes to the log
    log_path: str | None = None  # the local file the log is written to
    copy_to: str | None = None  # a URL the log is copied to when the command ends
    file_handler: logging.Handler | None = None
    verbose: bool = False


_state = _State()


def _own_warning_or_error(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
        return True
    own = record.name == "root" or record.name.split(".")[0] in OWN_LOGGERS
    return record.levelno >= logging.WARNING and own


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def started() -> bool:
    """Whether `start` has set up the console in this process."""
    return _state.file_handler is not None


def terminal() -> TextIO:
    """The stream that reaches the user's terminal for warnings and errors."""
    return _state.terminal or sys.stderr


def start(*, verbose: bool = False) -> None:
    """Sends library output to a temporary log (until `attach`) and keeps the terminal quiet."""
    if started():
        return
    _state.verbose = verbose
    fd, path = tempfile.mkstemp(prefix="deepcoro_jax-", suffix=".log")
    os.close(fd)
    _state.log_path = path
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    _remove_absl_handler(root)
    _state.file_handler = _file_handler(path)
    root.addHandler(_state.file_handler)
    terminal_handler = logging.StreamHandler(sys.stderr if verbose else None)
    if verbose:
        terminal_handler.setFormatter(logging.Formatter(_FORMAT))
    else:
        sys.stderr.flush()
        _state.terminal = os.fdopen(os.dup(2), "w", buffering=1)
        terminal_handler.setStream(_state.terminal)
        terminal_handler.addFilter(_own_warning_or_error)
        terminal_handler.setFormatter(_TerminalFormatter())
        _redirect_fd2(path)
        warnings.simplefilter("default")  # deprecation notices are logged, once each
    root.addHandler(terminal_handler)
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    atexit.register(_finish)


def attach(folder: str, name: str = LOG_FILE) -> str:
    """Moves the log into `folder` (created if needed) as `name`, appending; its path."""
    target = os.path.join(folder, name)
    if not started():
        return target
    if paths.is_url(folder):
        _state.copy_to = target  # copied at the end: a URL cannot take fd 2
        return target
    os.makedirs(folder, exist_ok=True)
    if _state.log_path == target:
        return target
    logging.getLogger().removeHandler(_state.file_handler)
    _state.file_handler.close()
    with open(target, "a") as out, open(_state.log_path) as earlier:
        out.write(earlier.read())
    os.remove(_state.log_path)
    _state.log_path = target
    _state.file_handler = _file_handler(target)
    logging.getLogger().addHandler(_state.file_handler)
    if not _state.verbose:
        _redirect_fd2(target)
    return target


def start_for_run(workdir: str, *, verbose: bool = False) -> None:
    """`start`, then `attach` to a trained run's `workdir` if it exists (the tools that read
    a run log into its log.txt; a mistyped --workdir is reported, not created)."""
    start(verbose=verbose)
    if paths.Path(workdir).is_dir():
        attach(workdir)


def log_path() -> str | None:
    """Where the log is (the workdir's once attached), or None without `start`."""
    return _state.copy_to or _state.log_path


def fatal(error: BaseException) -> int:
    """Logs `error`'s traceback and prints its cause as one line on the terminal; exit code 1."""
    text = "".join(traceback.format_exception(error))
    if started():
        _state.file_handler.stream.write(text)
        _state.file_handler.flush()
        where = f" (traceback in {log_path()})"
    else:
        where = ""
        terminal().write(text)
    message = " ".join(line.strip() for line in str(error).strip().splitlines())
    if len(message) > MAX_CAUSE:
        message = message[: MAX_CAUSE - 3] + "..."
    cause = f"{type(error).__name__}: {message}".rstrip(": ")
    terminal().write(f"error: {cause}{where}\n")
    terminal().flush()
    return 1


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def _remove_absl_handler(root: logging.Logger) -> None:
    """absl's handler writes every record to stderr; the handlers here replace it."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    root.removeHandler(absl_logging.get_absl_handler())
    absl_logging.set_verbosity(absl_logging.INFO)


def _redirect_fd2(path: str) -> None:
    """File descriptor 2 (C++ libraries' stderr, and Python's sys.stderr) to `path`."""
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 2)
    os.close(fd)


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """A background thread's exception goes to the log; the main thread reports its own."""
    if _state.file_handler is None:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else "?"
    _state.file_handler.stream.write(f"exception in thread {name}:\n{text}")
    _state.file_handler.flush()


def _finish() -> None:
    if _state.copy_to and _state.log_path and os.path.exists(_state.log_path):
        with open(_state.log_path) as f:
            paths.Path(_state.copy_to).write_text(f.read())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=console.parse_flags)``), with a bad
    flag or a config override of a field the config lacks reported in one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull for the flags.")
    except AttributeError as e:  # ml_collections: an override of a field the config lacks
        field = re.sub(r"^[\"']+|[\"']+$", "", str(e))
        overrides = [a.partition("=")[0] for a in argv if a.startswith("--config.")]
        if not any(field in o.split(".") for o in overrides):
            raise  # not about an override: an error in the config file itself
        sys.exit(
            f"FATAL Flags parsing error: the config has no field {field!r} "
            f"(overrides given: {overrides})"
        )
