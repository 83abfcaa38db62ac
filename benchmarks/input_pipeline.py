"""Throughput of the training input pipeline (tf.data, full augmentation), one line per size.

    python benchmarks/input_pipeline.py --config=configs/figaro.py --sizes=128,227

Reads the train split into arrays once (its time is printed on its own line), then for each
crop size builds ``pipeline.train_batches`` with ``config.augment`` and the config's global
batch size (``--config.train.batch_size=8`` changes it), pulls ``--warmup`` batches untimed
(tf.data start-up and autotuning) and times the next ``--num_batches``. Nothing but the
pipeline runs, so the figure is the most the host can feed the model.
"""

import os
import sys
import time
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ import each other
from configs import figaro  # noqa: E402
from hairseg_jax import cli, config_checks  # noqa: E402
from hairseg_jax.data import pipeline, sources  # noqa: E402
from hairseg_jax.data.examples import Examples  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/figaro.py.")
flags.DEFINE_list("sizes", [], "Crop sizes to time; default: config.data.image_size.")
flags.DEFINE_integer("warmup", 5, "Untimed batches before timing each size.", lower_bound=0)
flags.DEFINE_integer("num_batches", 50, "Timed batches per size.", lower_bound=1)
flags.mark_flags_as_required(["config"])
flags.register_validator(
    "sizes",
    lambda sizes: all(size.isdigit() and int(size) > 0 for size in sizes),
    message="--sizes must be positive whole numbers, e.g. 128,227",
)


def images_per_second(
    config: ml_collections.ConfigDict, examples: Examples, image_size: int
) -> float:
    """Augmented training images per second at ``image_size``, after the warm-up."""
    batch_size = config.train.batch_size
    batches = pipeline.train_batches(examples, batch_size, image_size, config.augment, config.seed)
    for _ in range(FLAGS.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
        next(batches)
    return FLAGS.num_batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.run_interruptibly(time_pipeline, "while timing")


def time_pipeline() -> None:
    """Reads the train split, then times each size: a line each."""
    config = FLAGS.config
    start = time.perf_counter()
    try:
        config_checks.expand_user(config)
        config_checks.check_config(config, template=figaro.get_config())
        examples = sources.load_examples(config, "train", config.data.max_train_images)
    except config_checks.USER_ERRORS as e:
        sys.exit(f"FATAL {e}")
    print(
        f"input_pipeline_read split=train images={len(examples)} "
        f"seconds={time.perf_counter() - start:.2f}",
        flush=True,
    )
    for size in [int(s) for s in FLAGS.sizes] or [config.data.image_size]:
        rate = images_per_second(config, examples, size)
        print(
            f"input_pipeline image_size={size} batch={config.train.batch_size} "
            f"images_per_s={rate:.1f} host_cores={os.cpu_count()} tf={pipeline.tf.__version__}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
