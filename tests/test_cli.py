"""What the command-line tools share (``hairseg_jax.cli``); its flag handling is tested
through main.py in test_main.py."""

import types

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
