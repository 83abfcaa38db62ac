"""The import arrows: model and step code must run on a bare JAX install."""

import subprocess
import sys

HOST_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "orbax")
PURE_JAX = (
    "hairseg_jax.models",
    "hairseg_jax.losses",
    "hairseg_jax.metrics",
    "hairseg_jax.sharding",
    "hairseg_jax.steps",
)


def test_model_and_step_modules_import_without_tensorflow_clu_or_orbax():
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in HOST_ONLY)
    imports = "".join(f"import {module}\n" for module in PURE_JAX)
    benchmark = (
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('tsb', 'benchmarks/train_step.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    code = f"import sys\n{blocked}{imports}{benchmark}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
