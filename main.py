"""Trains, evaluates or predicts (hair masks): ``python main.py --config=... --workdir=...``."""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, reports.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/figaro.py or configs/figaro.py:smoke.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override ends the program with one readable line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull for help.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        while isinstance(e, BaseException) and e.args:  # unwrap ml_collections' nesting
            e = e.args[0]
        overrides = " ".join(a for a in argv if a.startswith("--config."))
        sys.exit(f"FATAL Bad config override ({overrides}): {e}".replace("\n", " "))


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Imported after the flags: a mistyped flag or override is answered without loading JAX.
    from hairseg_jax import config_checks, evaluate, predict, sharding, steps
    from hairseg_jax.data.figaro1k import DataError
    from hairseg_jax.weights.tensors import ConversionError

    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = FLAGS.config
    logging.info("Config:\n%s", config)
    try:
        config_checks.check_config(config)
    except config_checks.ConfigError as e:
        sys.exit(f"FATAL {e}")
    sharding.initialize_distributed(config.distributed)
    if config.mode == "train":
        from hairseg_jax import train  # TensorFlow and clu: eval and predict run without them

        run = train.train_and_evaluate
    else:
        run = {"eval": evaluate.evaluate, "predict": predict.predict}[config.mode]
    try:
        result = run(config, FLAGS.workdir)
    except (
        config_checks.ConfigError,
        ConversionError,
        DataError,
        FileNotFoundError,
        sharding.ShardingError,
        steps.NonFiniteError,
    ) as e:
        sys.exit(f"FATAL {e}")
    if config.mode == "predict" and result["failed"]:
        # Exit status: the number of unreadable files (at most 100).
        print(f"FATAL {predict.failure_line(result)}", file=sys.stderr)
        sys.exit(min(len(result["failed"]), 100))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
