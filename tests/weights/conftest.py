"""Fixtures of the weight conversion tests: the PyTorch reference, a parity report."""

from types import ModuleType

import pytest

PARITY_ERRORS = pytest.StashKey[dict[str, tuple[float, float]]]()


@pytest.fixture(scope="session")
def parity_errors(request: pytest.FixtureRequest) -> dict[str, tuple[float, float]]:
    """Collects ``{"resnet50 OS8 layer3 227x171": (max abs error, max abs value)}``; printed
    at the end of the run."""
    return request.config.stash.setdefault(PARITY_ERRORS, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    errors = config.stash.get(PARITY_ERRORS, {})
    if errors:
        terminalreporter.section("torch -> Flax parity: max abs error")
        for name, (error, scale) in errors.items():
            terminalreporter.write_line(f"{name:<32} {error:.2e}  (max |value| {scale:.3g})")


@pytest.fixture(scope="session")
def reference(torch) -> ModuleType:
    """``hairseg_jax.weights.torch_reference`` (imports torch)."""
    from hairseg_jax.weights import torch_reference

    return torch_reference
