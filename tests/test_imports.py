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
    "hairseg_jax.threefry",
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


def test_evaluation_and_device_training_import_without_tensorflow_or_clu():
    """Accelerator hosts without TensorFlow evaluate and run benchmarks/time_to_dice.py."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in HOST_ONLY[:3])
    imports = (
        "import hairseg_jax.evaluate, hairseg_jax.predict\n"
        "import hairseg_jax.data.device_augment, hairseg_jax.data.sources\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('ttd', 'benchmarks/time_to_dice.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"import sys\n{blocked}{imports}"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
