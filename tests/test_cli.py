"""What the command-line tools share (``hairseg_jax.cli``); its flag handling is tested
through main.py in test_main.py."""

import logging
import types

from absl import logging as absl_logging

from hairseg_jax import cli
from tests.conftest import run_python


def test_a_failed_restores_late_errors_are_dropped_and_others_passed_on():
    seen = []
    hook = cli.late_restore_errors_dropped(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"), object=None)
    value = types.SimpleNamespace(exc_value=ValueError("Event loop is closed"), object=None)
    serialization = "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
    reading = types.SimpleNamespace(  # "Exception ignored in: <coroutine object ...>"
        exc_value=Exception("Encountered error while reading array index: ..."),
        object=types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=serialization)),
    )
    elsewhere = types.SimpleNamespace(
        exc_value=Exception("mine"),
        object=types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename="/work/x.py")),
    )
    for unraisable in (closed, other, value, reading, elsewhere):
        hook(unraisable)
    assert seen == [other, value, elsewhere]


# A compilation that a Ctrl-C interrupts (SIGINT 0.3 s into a compile of a few seconds).
INTERRUPTED_COMPILE = """
import os, signal, threading
import jax, jax.numpy as jnp
from hairseg_jax import cli

def chain(x):
    for i in range(300):
        x = jnp.sin(x @ x + i)
    return x

lowered = jax.jit(chain).lower(jnp.ones((64, 64)))
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
with cli.ending_on_ctrl_c("while compiling"):
    lowered.compile()
print("compiled before the interrupt")
"""


def test_an_interrupted_compilation_ends_with_one_line_and_status_130():
    """Python's shutdown after a Ctrl-C in a compilation (sys.exit) was a segmentation fault:
    XLA's compiling thread used the backend that the shutdown freed."""
    result = run_python("-c", INTERRUPTED_COMPILE, timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "FATAL Interrupted while compiling."
    assert "compiled before" not in result.stdout


# A Ctrl-C whose KeyboardInterrupt is raised in a gc callback, as one can be in JAX's.
INTERRUPTED_GC_CALLBACK = """
import gc
from hairseg_jax import cli

def callback(phase, info):
    raise KeyboardInterrupt  # a SIGINT that arrived while the callback ran

def main():
    gc.callbacks.append(callback)
    gc.collect()
    print("went on after the interrupt")

cli.run_interruptibly(main, "while collecting")
"""


def test_a_ctrl_c_in_a_gc_callback_still_ends_the_program():
    """Python only prints such an interrupt ("Exception ignored in ...") and goes on: in CI a
    Ctrl-C of benchmarks/train_step.py landed in JAX's gc callback, and the benchmark ran to
    its end with status 0."""
    result = run_python("-c", INTERRUPTED_GC_CALLBACK, timeout=60)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip() == "FATAL Interrupted while collecting."
    assert "went on" not in result.stdout


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


def test_orbax_tasks_errors_nobody_retrieved_are_dropped_and_others_kept():
    """The reads of a damaged checkpoint that orbax gave up: asyncio logs each failed one when
    it is collected, after the run's FATAL line has named the checkpoint."""
    quiet = cli._QuietLibraries()
    base_events = "/usr/lib/python3.11/asyncio/base_events.py"

    def task(where: str) -> logging.LogRecord:
        message = (
            "Task exception was never retrieved\nfuture: <Task finished name='Task-731' "
            f"coro=<async_deserialize() done, defined at {where}:394> exception=Exception()>"
        )
        return logging.LogRecord("asyncio", logging.ERROR, base_events, 1771, message, None, None)

    assert not quiet.filter(task("/venv/site-packages/orbax/checkpoint/_src/serialization.py"))
    assert quiet.filter(task("/repo/hairseg_jax/predict.py"))
