"""The import arrows: model and step code must run on a bare JAX install."""

from tests.conftest import run_python

HOST_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "orbax")
PURE_JAX = (
    "hairseg_jax.models",
    "hairseg_jax.losses",
    "hairseg_jax.metrics",
    "hairseg_jax.sharding",
    "hairseg_jax.steps",
    "hairseg_jax.threefry",
)
DATA = (
    "hairseg_jax.data.device_augment",
    "hairseg_jax.data.pipeline",
    "hairseg_jax.data.sources",
    "hairseg_jax.data.split",
    "hairseg_jax.data.whole_images",
)


def succeeds(code: str) -> None:
    """Runs ``code`` in a fresh Python and asserts it succeeds."""
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr


def imported_after(modules: tuple[str, ...]) -> str:
    """Code that imports ``modules``, then sets ``loaded`` to the package modules loaded."""
    imports = "".join(f"import {module}\n" for module in modules)
    return f"import sys\n{imports}loaded = [m for m in sys.modules if 'hairseg_jax.' in m]\n"


def test_model_and_step_modules_import_without_tensorflow_clu_or_orbax():
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in HOST_ONLY)
    imports = "".join(f"import {module}\n" for module in PURE_JAX)
    benchmark = (
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('tsb', 'benchmarks/train_step.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    succeeds(f"import sys\n{blocked}{imports}{benchmark}")


def test_model_and_step_modules_import_nothing_of_the_data_or_the_loop():
    succeeds(
        imported_after(PURE_JAX)
        + "bad = [m for m in loaded if m.startswith(('hairseg_jax.data', 'hairseg_jax.train',"
        " 'hairseg_jax.evaluate', 'hairseg_jax.predict', 'hairseg_jax.checkpoints'))]\n"
        "assert not bad, bad\n"
    )


def test_data_modules_import_neither_the_model_nor_the_loop():
    succeeds(
        imported_after(DATA)
        + "bad = [m for m in loaded if m.startswith(('hairseg_jax.models', 'hairseg_jax.train',"
        " 'hairseg_jax.steps', 'hairseg_jax.evaluate'))]\n"
        "assert not bad, bad\n"
    )


def test_evaluation_and_device_training_import_without_tensorflow_or_clu():
    """Accelerator hosts without TensorFlow evaluate and predict with ``main.py`` (which
    imports the training loop only to train) and train with benchmarks/time_to_dice.py."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in HOST_ONLY[:3])
    succeeds(f"import sys\n{blocked}import main, hairseg_jax.evaluate, hairseg_jax.predict\n")
    imports = (
        "import hairseg_jax.data.device_augment, hairseg_jax.data.sources\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('ttd', 'benchmarks/time_to_dice.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    succeeds(f"import sys\n{blocked}{imports}")


def test_main_parses_its_flags_before_importing_jax():
    """A mistyped flag or override is answered in a second, before JAX is loaded."""
    succeeds(
        "import sys\nimport main\n"
        "assert not {'jax', 'tensorflow', 'hairseg_jax.config_checks'} & set(sys.modules), "
        "sorted(m for m in sys.modules if m.startswith(('jax', 'hairseg')))\n"
    )
