"""Shared test fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def figaro_dir() -> Path:
    """The real Figaro1k root: $FIGARO1K_DIR, else data/Figaro1k, else ../shared/Figaro1k."""
    env = os.environ.get("FIGARO1K_DIR")
    if env:
        candidates = [Path(env)]
    else:
        candidates = [REPO / "data" / "Figaro1k", REPO.parent / "shared" / "Figaro1k"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = " or ".join(str(p) for p in candidates)
    message = f"Figaro1k not found at {tried}; set FIGARO1K_DIR or link data/Figaro1k"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
