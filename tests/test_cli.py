"""What the command-line tools share (``hairseg_jax.cli``); its flag handling is tested
through main.py in test_main.py."""

import logging
import types

from absl import logging as absl_logging

from hairseg_jax import cli


def test_closed_loop_errors_are_dropped_and_others_passed_on():
    seen = []
    hook = cli.closed_loop_errors_dropped(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    value = types.SimpleNamespace(exc_value=ValueError("Event loop is closed"))
    for unraisable in (closed, other, value):
        hook(unraisable)
    assert seen == [other, value]


def record(pathname: str, level: int, error: Exception | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, error.__traceback__) if error else None
    return logging.LogRecord("absl", level, pathname, 1, "message", None, exc_info)


def test_orbax_info_lines_are_dropped_and_its_errors_kept_without_tracebacks():
    """A failed background save: orbax logs it with tracebacks, several times; the FATAL line
    reports it. ``--verbosity=1`` keeps the tracebacks."""
    quiet = cli._QuietLibraries()
    orbax = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        failed = e
    assert not quiet.filter(record(orbax, logging.INFO))
    error = record(orbax, logging.ERROR, failed)
    assert quiet.filter(error) and error.exc_info is None
    assert "Traceback" not in logging.Formatter().format(error)
    ours = record("/repo/hairseg_jax/train.py", logging.ERROR, failed)
    assert quiet.filter(ours) and "Traceback" in logging.Formatter().format(ours)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(1)
    try:
        kept = record(orbax, logging.ERROR, failed)
        assert quiet.filter(kept) and "Traceback" in logging.Formatter().format(kept)
    finally:
        absl_logging.set_verbosity(verbosity)


def test_orbax_warnings_pass_the_quiet_filter():
    quiet = cli._QuietLibraries()
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    record = logging.LogRecord("absl", logging.WARNING, orbax, 1, "message", None, None)
    assert quiet.filter(record)


def test_the_missing_tpu_info_line_is_dropped_and_other_backend_lines_kept():
    """JAX logs it on every machine without a TPU; a failing CUDA plugin's reason stays."""
    quiet = cli._QuietLibraries()
    bridge = "/venv/site-packages/jax/_src/xla_bridge.py"

    def line(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("jax._src.xla_bridge", level, bridge, 849, message, None, None)

    tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so"
    assert not quiet.filter(line(logging.INFO, tpu))
    assert quiet.filter(line(logging.WARNING, tpu))
    assert quiet.filter(line(logging.INFO, "Unable to initialize backend 'cuda': no driver"))
