"""Shared test fixtures."""

import atexit
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.tree_util import tree_map_with_path

from hairseg_jax import steps

REPO = Path(__file__).resolve().parents[1]

# One persistent JAX compilation cache for the test session: the first process to import this
# file makes it, the processes it starts (xdist workers, main.py runs) inherit the variable. A
# test that compiles a step some test compiled before, as each train_and_evaluate and main.py
# run does, loads it instead. A cache named in the environment is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hairseg_jax_tests_jit_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

# The overrides of configs/figaro.py:smoke under which test_preemption's runs, test_eval_report's
# training and test_benchmarks' time_to_dice run compile one and the same train step (64 px,
# 16-channel heads, batch 4, 8 steps, an EMA): the first compiles it, the others load it from
# the cache above. A file that changes one of these values for itself compiles its own.
SHARED_TRAIN_STEP = {
    "data.image_size": 64,
    "eval.image_size": 64,
    "model.aspp_channels": 16,
    "model.decoder_channels": 16,
    "train.batch_size": 4,
    "train.num_steps": 8,
    "train.ema_decay": 0.9,
}


def config_flags(overrides: dict[str, object]) -> list[str]:
    """``{"train.num_steps": 8}`` -> ``["--config.train.num_steps=8"]``."""
    return [f"--config.{name}={value}" for name, value in overrides.items()]


# The test files that take longest, longest first (140-190 s of work each down to about 50 s
# in a 2-worker run on a 2-core CPU, `--durations=0`, 2026-12-03). They start first and the
# rest follow in collection order, so that with `--dist loadfile --no-loadscope-reorder` the
# two workers end together (xdist's own reorder, by test count, left test_preemption.py's
# three tests, four minutes, running alone at the end).
LONGEST_FIRST = (
    "test_preemption.py",
    "test_benchmarks.py",
    "test_main.py",
    "test_sharding.py",
    "models/test_layers.py",
    "test_mixed_precision.py",
    "test_eval_report.py",
    "test_train.py",
    "test_steps.py",
    "weights/test_parity.py",
    "test_export.py",
    "data/test_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Orders the files ``LONGEST_FIRST``; tests keep their order within a file."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def file_rank(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(REPO / "tests").as_posix(), len(rank))

    items.sort(key=file_rank)


def run_python(
    *args: str,
    env: dict[str, str | None] | None = None,
    timeout: float = 600,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Runs ``python *args`` in ``cwd`` (the repo) on the CPU (plus ``env``; a None value
    removes that variable), capturing its output."""
    merged = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    env = {name: value for name, value in merged.items() if value is not None}
    command = [sys.executable, *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_without_backend(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python *args`` with ``JAX_PLATFORMS=cuda`` on this CPU-only install and checks
    that it stops with main.py's one line naming the backend that cannot start."""
    result = run_python(*args, env={"JAX_PLATFORMS": "cuda"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("FATAL JAX cannot start its backend (JAX_PLATFORMS='cuda'): ")
    )
    return result


def missing(message: str) -> NoReturn:
    """Fails the test in CI (``CI`` set to true, yes or 1), else skips it with ``message``."""
    if os.environ.get("CI", "").lower() in ("true", "yes", "1"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def figaro_dir() -> Path:
    """The real Figaro1k root: $FIGARO1K_DIR, else data/Figaro1k, else ../shared/Figaro1k."""
    env = os.environ.get("FIGARO1K_DIR")
    if env:
        candidates = [Path(env)]
    else:
        candidates = [REPO / "data" / "Figaro1k", REPO.parent / "shared" / "Figaro1k"]
    for path in candidates:
        if (path / "train_val_test.json").is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    missing(f"no Figaro1k (train_val_test.json) at {tried}; set FIGARO1K_DIR or link data/Figaro1k")


@pytest.fixture(scope="session")
def torch() -> ModuleType:
    """The torch module (the ``torch`` extra); a test that needs it fails in CI without it."""
    try:
        import torch
    except ImportError:
        missing("torch is not installed: pip install -e '.[torch]'")
    return torch


class TinyNet(nn.Module):
    """3x3 conv, BatchNorm, ReLU, dropout (if ``dropout``), 1x1 conv: every collection and
    key a train step uses, compiled in a moment; for tests of the loop, not of the model."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Conv(1, (1, 1))(x)


def random_variables(model, image_size: int, seed: int = 0) -> dict:
    """Random ``{"params", "batch_stats"}`` of a Flax model without compiling ``model.init``
    (seconds instead of tens of seconds on a CPU): LeCun-normal kernels, zero biases and
    identity BatchNorm. Logits stay moderate, so masks are neither empty nor full."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = math.sqrt(1 / math.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return tree_map_with_path(draw, steps.variable_shapes(model, image_size))
