"""Trains or evaluates a hair segmenter: ``python main.py --config=... --workdir=...``."""

from absl import app, flags, logging
from ml_collections import config_flags

from hairseg_jax import evaluate, train

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
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    logging.info("Config:\n%s", config)
    if config.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif config.mode == "eval":
        evaluate.evaluate(config, FLAGS.workdir)
    else:
        raise app.UsageError(f"Unknown --config.mode={config.mode!r}; use train or eval.")


if __name__ == "__main__":
    app.run(main)
