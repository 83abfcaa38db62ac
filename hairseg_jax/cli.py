"""What main.py and the package's command-line tools share: a bad flag, config file or config
override answered in one line; orbax's INFO chatter and tracebacks left out of the log.

Standard library and absl only, so a mistyped flag is answered before JAX is loaded.
"""

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from absl import flags
from absl import logging as absl_logging


def _one_line(message: str) -> str:
    """A message that may hold a traceback as one line: its first line and the error's."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def innermost(error: BaseException) -> object:
    """The innermost argument of an error that ml_collections nests in others (for a missing
    field, the field's quoted name)."""
    cause: object = error
    while isinstance(cause, BaseException) and cause.args:
        cause = cause.args[0]
    return cause


def home_expanded(value: str, name: str) -> str:
    """``value`` with a leading ``~`` or ``~user`` expanded, as a shell would (it leaves
    ``--flag=~/x`` as it is). Raises ValueError, naming the flag or field ``name``, for a
    ``~user`` of no known user (``~runs/x`` for ``~/runs/x``): left as it is, it would name a
    folder called ``~runs``."""
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value[1:].split(os.sep)[0]
        raise ValueError(f"{name}={value!r}: there is no user {user!r} ('~/' is your home).")
    return expanded


def _config_values(argv: list[str]) -> list[str]:
    """The values ``argv`` gives ``--config`` (``--config=x`` or ``--config x``)."""
    values = [a.removeprefix("--config=") for a in argv[1:] if a.startswith("--config=")]
    return values + [b for a, b in zip(argv[1:], argv[2:], strict=False) if a == "--config"]


def _raised_in_config_file(error: BaseException, argv: list[str]) -> bool:
    """Whether ``error``, or an error it was raised from or during, passed through the code of
    the ``--config`` file that ``argv`` gives (its get_config() raised it)."""
    files = {os.path.abspath(value.split(":")[0]) for value in _config_values(argv)}
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None:
            if os.path.abspath(frame.tb_frame.f_code.co_filename) in files:
                return True
            frame = frame.tb_next
        error = error.__cause__ or error.__context__
    return False


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags (absl's ``flags_parser``); a bad flag, an unloadable ``--config`` file or a
    bad ``--config.*`` override ends the program with one readable line."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # a config file that failed to load raises on any use
    except flags.Error as e:
        if "--config must have a value other than None" in str(e) and _config_values(argv):
            sys.exit("FATAL Cannot load the --config file: its get_config() returned None.")
        if "get_config() takes 0 positional arguments" in str(e):  # e.g. figaro_cpu.py:smoke
            sys.exit(
                "FATAL Cannot load the --config file: it has no variants (the ':name' after "
                "the file's name)."
            )
        if "Error whilst parsing config file:" in str(e):  # its get_config() raised
            cause = str(e).strip().splitlines()[-1].strip()  # after the traceback
            sys.exit(f"FATAL Cannot load the --config file: {cause}")
        if "Unknown command line flag 'config." in str(e) and not _config_values(argv):
            sys.exit(
                "FATAL Flags parsing error: --config.* overrides need a --config file to "
                "override (e.g. --config=configs/figaro.py)."
            )
        sys.exit(
            f"FATAL Flags parsing error: {_one_line(str(e))} (--helpshort or --helpfull for help)"
        )
    except OSError as e:  # ml_collections: the config file could not be loaded
        last = str(e).strip().splitlines()[-1].strip()  # the cause, e.g. "[Errno 2] No such ..."
        sys.exit(f"FATAL Cannot load the --config file: {last}")
    except (SyntaxError, ImportError) as e:  # in the config file's own code
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name == "configs":
            hint = " (the shipped configs import configs.figaro: run from the repository's root)"
        sys.exit(f"FATAL Cannot load the --config file: {type(e).__name__}: {e}{hint}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        cause = innermost(e)
        overrides = [a for a in argv if a.startswith("--config.")]
        named = re.match(r"'([^']+)'", cause) if isinstance(cause, str) else None
        if named:  # a field no config has: only the overrides that name it
            name = named.group(1)
            overrides = [a for a in overrides if name in a.split("=")[0].split(".")] or overrides
        overrides = " ".join(overrides)
        if isinstance(e, AttributeError) and "attribute 'get_config'" in str(e):
            sys.exit("FATAL Cannot load the --config file: it defines no get_config().")
        if isinstance(cause, str) and cause.startswith("Attribute <class 'NoneType'>."):
            sys.exit("FATAL Cannot load the --config file: its get_config() returned None.")
        if not overrides or _raised_in_config_file(e, argv):
            sys.exit(f"FATAL Cannot load the --config file: {type(e).__name__}: {e}")
        what = (
            f"no such field {cause}" if isinstance(cause, str) and cause.startswith("'") else cause
        )
        sys.exit(f"FATAL Bad config override ({overrides}): {what}".replace("\n", " "))
    return rest


def fatal_now(message: str, status: int) -> NoReturn:
    """Ends the program at once, from any thread, with one line, "FATAL ``message``", and exit
    status ``status``, skipping Python's shutdown (where work still running in another thread
    could crash it)."""
    print(f"FATAL {message}", file=sys.stderr)
    absl_logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def interrupted(what: str) -> NoReturn:
    """Ends the program after a Ctrl-C (KeyboardInterrupt) with one line, "FATAL Interrupted
    ``what``.", and exit status 130, skipping Python's shutdown: an XLA compilation that the
    interrupt stopped waiting for goes on in its own thread, and crashed that shutdown (a
    segmentation fault) by using the backend it freed. Callers' ``finally`` blocks have run."""
    fatal_now(f"Interrupted {what}.", 130)


@contextlib.contextmanager
def ending_on_ctrl_c(what: str) -> Iterator[None]:
    """Runs the ``with`` block; a Ctrl-C during it ends the program with ``interrupted(what)``.
    That includes a Ctrl-C whose KeyboardInterrupt Python would print as "Exception ignored"
    and go on from: one raised in a gc callback (JAX runs one at each collection) or in a
    finalizer, which left the program running to its end with status 0."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            interrupted(what)
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except KeyboardInterrupt:
        interrupted(what)
    finally:
        if sys.unraisablehook is hook:  # else a hook set in the block wraps it: kept
            sys.unraisablehook = previous


def run_interruptibly(main: Callable[[], None], what: str) -> None:
    """Runs ``main``; a Ctrl-C during it ends the program with ``interrupted(what)``."""
    with ending_on_ctrl_c(what):
        main()


class _QuietLibraries(logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still pass, without their
    tracebacks unless ``--verbosity=1`` or more (a failed background save logs several, and
    the run reports the same error in its FATAL line). Drops JAX's INFO line "Unable to
    initialize backend 'tpu': ... Failed to open libtpu.so" of every machine without a TPU
    (a backend that was asked for and fails stops the run with its own line). Drops asyncio's
    "Task exception was never retrieved" for orbax's tasks, unless ``--verbosity=1`` or more:
    the reads of a damaged checkpoint that orbax gave up, reported in the run's FATAL line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and str(record.msg).startswith(
            "Unable to initialize backend 'tpu'"
        ):
            return False
        if record.name == "asyncio" and absl_logging.get_verbosity() < 1:
            message = record.getMessage()
            if message.startswith("Task exception was never retrieved") and "/orbax/" in message:
                return False
        if "/orbax/" not in record.pathname:
            return True
        if record.exc_info and absl_logging.get_verbosity() < 1:
            record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING


def late_restore_errors_dropped(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that drops the late errors of a restore that orbax gave up (a
    damaged checkpoint, which the run reports in its FATAL line) and passes the rest to
    ``previous``: TensorStore reads still in flight end after orbax closed its event loop ("Event
    loop is closed"), and orbax's reading coroutines raise their own errors when collected;
    each would print a traceback."""

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        if code is not None and "/orbax/" in code.co_filename:
            return
        previous(unraisable)

    return hook


def quiet_libraries() -> None:
    """Leaves orbax's INFO lines and tracebacks out of absl's log (``_QuietLibraries``), and
    the late errors of a failed restore out of stderr (``late_restore_errors_dropped``)."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = late_restore_errors_dropped(sys.unraisablehook)
