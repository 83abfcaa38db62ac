"""Trains, evaluates or predicts (hair masks): ``python main.py --config=... --workdir=...``."""

import os
import sys
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs import figaro
from hairseg_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, reports.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/figaro.py or configs/figaro.py:smoke.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"FATAL Unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    with cli.ending_on_ctrl_c(f"in {FLAGS.config.mode} mode"):  # training's loop checkpoints
        run(FLAGS.config, FLAGS.workdir)  # and stops at a first Ctrl-C instead


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks ``config`` and ``workdir`` (``~`` expanded in both), then trains, evaluates or
    predicts as ``config.mode`` says."""
    # Imported after the flags: a mistyped flag or override is answered without loading JAX.
    import jax

    from hairseg_jax import config_checks, evaluate, predict, sharding

    cli.quiet_libraries()
    logging.info("Config:\n%s", config)
    try:
        folder = config_checks.folder_flag(workdir, "--workdir")
        config_checks.expand_user(config)
        config_checks.check_config(config, template=figaro.get_config())
        use_compilation_cache(config.compilation_cache)
        sharding.initialize_distributed(config.distributed)
        sharding.start_backend()
        if config.mode == "train":
            from hairseg_jax import train  # TensorFlow and clu: eval and predict run without

            result = train.train_and_evaluate(config, folder)
        else:
            result = {"eval": evaluate.evaluate, "predict": predict.predict}[config.mode](
                config, folder
            )
    except config_checks.USER_ERRORS as e:
        sys.exit(f"FATAL {e}")
    except MemoryError as e:  # the host's, e.g. NumPy's for a mistyped eval.image_size
        sys.exit(f"FATAL Out of host memory in {config.mode} mode ({e}): lower the sizes.")
    except jax.errors.JaxRuntimeError as e:  # the accelerator's, for too large a batch or size
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        cause = str(e).strip().splitlines()[0]
        sys.exit(
            f"FATAL Out of accelerator memory in {config.mode} mode ({cause}): lower the batch "
            "size or the image size, or set model.dtype=bfloat16."
        )
    if config.mode == "predict" and result["failed"]:
        # Exit status: the number of files that could not be predicted (at most 100).
        print(f"FATAL {predict.failure_line(result)}", file=sys.stderr)
        sys.exit(min(len(result["failed"]), 100))


def use_compilation_cache(folder: str) -> None:
    """Keeps JAX's compiled programs in ``folder``, where later runs of the same model and
    shapes load them instead of compiling; none if ``folder`` is "" or cannot be made (a
    warning). ``$JAX_COMPILATION_CACHE_DIR``, where set, is JAX's own choice and stays."""
    if not folder or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.warning("Compiling without a cache: config.compilation_cache=%r: %s", folder, e)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
