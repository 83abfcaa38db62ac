"""Time to Dice: trains a config from scratch, then scores the test split at original resolution.

Runs on a bare JAX install (JAX, flax, optax, orbax-checkpoint, ml-collections, PIL: no
TensorFlow, no clu), so it measures on accelerator hosts that cannot run ``main.py`` (its
training loop imports the tf.data pipeline and clu). Batches are drawn and augmented on the
accelerator whatever ``config.augment.on_device`` says (``hairseg_jax.data.device_augment``,
from the training images shrunk to ``config.augment.device_max_side``); the train and predict
steps and the scoring are the package's own. It saves no checkpoint and runs no validation:
the model scored is the one after the last step (its EMA weights if kept).

    python benchmarks/time_to_dice.py --config=configs/figaro.py:scratch \\
        --config.data.data_dir=/tmp/figaro_small

Prints a line every ``--log_every`` steps and one summary line; ``--out`` also writes the
summary as JSON. ``--budget_s`` stops training early (the summary says so) once that many
seconds of training have passed.
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ import each other
from configs import figaro  # noqa: E402
from hairseg_jax import cli, config_checks, evaluate, models, sharding, steps  # noqa: E402
from hairseg_jax.data import device_augment, sources  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/figaro.py:scratch.")
flags.DEFINE_integer("log_every", 200, "Steps between progress lines.")
flags.DEFINE_float("budget_s", 0.0, "> 0: stop training after this many seconds.")
flags.DEFINE_string("out", "", "JSON file for the summary.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.log_every < 1:
        raise app.UsageError("--log_every must be positive.")
    if FLAGS.budget_s < 0:
        raise app.UsageError("--budget_s must not be negative (0: none).")
    config = FLAGS.config
    if config.data.progressive_sizes:
        raise app.UsageError("Progressive resizing is not supported here; pass '()'.")
    with cli.ending_on_ctrl_c("while timing"):
        try:
            config_checks.expand_user(config)
            config_checks.check_config(config, template=figaro.get_config())
            if FLAGS.out:  # before the run, not after it
                out = Path(FLAGS.out)
                if out.is_dir():
                    raise config_checks.ConfigError(f"--out={FLAGS.out} is a folder.")
                config_checks.make_folder(out.absolute().parent, "the folder of --out")
            summary = train_and_score(config)
            if FLAGS.out:
                Path(FLAGS.out).write_text(json.dumps(summary, indent=2, default=str))
        except config_checks.USER_ERRORS as e:
            sys.exit(f"FATAL {e}")


def train_and_score(config) -> dict:
    """Trains ``config`` from scratch, scores its eval split, prints the lines and returns
    the summary."""
    begin = time.perf_counter()
    mesh = sharding.data_mesh()
    batch_size, image_size = config.train.batch_size, config.data.image_size
    sharding.check_batch_size(batch_size, mesh, "config.train.batch_size")
    train = sources.load_examples(config, "train", config.data.max_train_images)
    test = sources.load_examples(config, config.eval.split, config.eval.max_images)
    packed = sharding.replicate(device_augment.pack(train, config.augment.device_max_side), mesh)
    total_steps = steps.total_train_steps(config.train, len(train))
    if not total_steps:
        raise app.UsageError(f"Batch {batch_size} is larger than the {len(train)} train images.")
    read_s = time.perf_counter() - begin

    state, _ = steps.initial_train_state(
        config, models.build_model(config.model), total_steps, mesh
    )
    train_step, _ = steps.jit_steps(config, mesh)
    next_batch = jax.jit(
        device_augment.batch_fn(batch_size, image_size, config.augment, config.seed),
        out_shardings=sharding.batch_sharded(mesh),
    )
    start = time.perf_counter()
    batch = next_batch(packed, 0)
    train_step = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    print(
        f"{len(train)} train images packed to {packed.images.shape[1]} px, {total_steps} steps "
        f"of batch {batch_size} at {image_size} px ({total_steps * batch_size / len(train):.3g} "
        f"epochs) on {mesh.size}x{jax.devices()[0].device_kind}; read {read_s:.1f} s, "
        f"compile {compile_s:.1f} s",
        flush=True,
    )

    start = last_time = time.perf_counter()
    last_done = 0
    nonfinite, stopped_at = 0, None
    for step in range(total_steps):
        state, step_metrics = train_step(state, batch)
        if step + 1 < total_steps:
            batch = next_batch(packed, step + 1)
        nonfinite += step_metrics["nonfinite"]
        done = step + 1
        # The budget is checked at each step: the steps are dispatched ahead of the device,
        # so training goes on at most for the steps in flight (it waits for them below).
        over_budget = FLAGS.budget_s and time.perf_counter() - start > FLAGS.budget_s
        if done % FLAGS.log_every == 0 or done == total_steps or over_budget:
            loss = float(step_metrics["loss"])  # waits for the step
            now = time.perf_counter()
            rate = (done - last_done) * batch_size / (now - last_time)
            print(
                f"step {done}/{total_steps} loss {loss:.4f} {rate:.0f} img/s "
                f"train {now - start:.0f} s",
                flush=True,
            )
            last_time, last_done = now, done
            if over_budget and done < total_steps:
                stopped_at = done
                break
    jax.block_until_ready(state)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    scores = evaluate.scorer(config, state, mesh)(
        test, threshold=evaluate.effective_threshold(config.eval.threshold)
    )
    eval_s = time.perf_counter() - start
    for row in scores.rows:
        row["hair_type"] = evaluate.hair_type(row["name"])
    summary = {
        "dice": scores.summary["dice"],
        "pooled_dice": scores.summary["pooled_dice"],
        "iou": scores.summary["iou"],
        "split": config.eval.split,
        "num_images": scores.summary["num_images"],
        "steps": done,
        "total_steps": total_steps,
        "stopped_early_at": stopped_at,
        "nonfinite_steps": int(nonfinite),
        "train_s": train_s,
        "compile_s": compile_s,
        "read_s": read_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - begin,
        "train_img_per_s": done * batch_size / train_s,
        "per_hair_type": evaluate.per_hair_type(scores.rows),
        "no_tta": scores.summary.get("no_tta"),
        "device": f"{mesh.size}x{jax.devices()[0].device_kind}",
        "host_cores": os.cpu_count(),
        "jax": jax.__version__,
        "config": config.to_dict(),
    }
    print(
        f"time_to_dice backbone={config.model.backbone} size={image_size} batch={batch_size} "
        f"dtype={config.model.dtype} steps={done}/{total_steps} train_s={train_s:.1f} "
        f"compile_s={compile_s:.1f} eval_s={eval_s:.1f} wall_s={summary['wall_s']:.1f} "
        f"img_per_s={summary['train_img_per_s']:.0f} "
        f"{config.eval.split}_dice={summary['dice']:.4f} "
        f"pooled_dice={summary['pooled_dice']:.4f} iou={summary['iou']:.4f} "
        f"nonfinite_steps={summary['nonfinite_steps']} device={summary['device']}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
