"""What main.py and the package's command-line tools share: a bad flag, config file or config
override answered in one line, and orbax's INFO chatter left out of the log.

Standard library and absl only, so a mistyped flag is answered before JAX is loaded.
"""

import logging
import sys

from absl import flags
from absl import logging as absl_logging


def _one_line(message: str) -> str:
    """A message that may hold a traceback as one line: its first line and the error's."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags (absl's ``flags_parser``); a bad flag, an unloadable ``--config`` file or a
    bad ``--config.*`` override ends the program with one readable line."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # a config file that failed to load raises on any use
    except flags.Error as e:
        sys.exit(
            f"FATAL Flags parsing error: {_one_line(str(e))}\n"
            "Pass --helpshort or --helpfull for help."
        )
    except OSError as e:  # ml_collections: the config file could not be loaded
        last = str(e).strip().splitlines()[-1].strip()  # the cause, e.g. "[Errno 2] No such ..."
        sys.exit(f"FATAL Cannot load the --config file: {last}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        while isinstance(e, BaseException) and e.args:  # unwrap ml_collections' nesting
            e = e.args[0]
        overrides = " ".join(a for a in argv if a.startswith("--config."))
        what = f"no such field {e}" if isinstance(e, str) and e.startswith("'") else e
        sys.exit(f"FATAL Bad config override ({overrides}): {what}".replace("\n", " "))
    return rest


class _QuietLibraries(logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_libraries() -> None:
    """Leaves orbax's INFO lines out of absl's log."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
