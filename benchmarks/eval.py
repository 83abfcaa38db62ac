"""Wall time of ``--config.mode=eval``, split into its phases, on one line.

    python benchmarks/eval.py --config=configs/figaro_cpu.py --workdir=runs/figaro_cpu_v1

Runs the functions ``hairseg_jax.evaluate.evaluate`` runs, in its order, without writing the
reports: building the state (``state_s``: the model, the template and the restore of the
workdir's best checkpoint, or of ``config.model.pretrained``), reading the split at original
resolution (``read_s``), and predicting and scoring it (``predict_score_s``, with
``config.eval``'s TTA and the threshold eval would use; it includes the predict step's
compile). Without ``--workdir`` and pretrained weights it evaluates randomly initialised
weights (``weights=random``; that state is built by ``steps.create_train_state``); a
``--workdir`` without a best checkpoint stops with main.py's error.
``--warm_pass`` adds ``predict_score_warm_s``, a second pass with the predict step compiled.
"""

import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
import optax
from absl import app, flags
from jax.sharding import Mesh
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ import each other
from configs import figaro  # noqa: E402
from hairseg_jax import cli, config_checks, evaluate, models, sharding, steps  # noqa: E402
from hairseg_jax.data import sources  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/figaro_cpu.py.")
flags.DEFINE_string("workdir", "", "Workdir with a best/ checkpoint; empty: random weights.")
flags.DEFINE_bool("warm_pass", False, "Also time a second predict+score pass.")
flags.mark_flags_as_required(["config"])


def random_state(config: ml_collections.ConfigDict, mesh: Mesh) -> steps.TrainState:
    """A randomly initialised state for ``config.model``, replicated over ``mesh``."""
    model = models.build_model(config.model)
    return steps.create_train_state(
        jax.random.PRNGKey(config.seed), model, config.eval.image_size, optax.identity(), mesh=mesh
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    with cli.ending_on_ctrl_c("while evaluating"):
        try:
            config_checks.expand_user(FLAGS.config)
            config_checks.check_config(FLAGS.config, template=figaro.get_config())
            print(measure(FLAGS.config, FLAGS.workdir, FLAGS.warm_pass), flush=True)
        except config_checks.USER_ERRORS as e:
            sys.exit(f"FATAL {e}")


def measure(config: ml_collections.ConfigDict, workdir: str, warm_pass: bool) -> str:
    """The benchmark's line for ``config``'s evaluation of ``workdir`` ("": random weights
    where ``config`` has no pretrained ones), with a second, warm pass if ``warm_pass``."""
    if workdir and not Path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir={workdir} is not a folder.")
    mesh = sharding.data_mesh()
    start = time.perf_counter()
    if workdir or config.model.pretrained:
        state, _, step = evaluate.load_state(config, Path(workdir), mesh)
        weights = f"step_{step}" if step else "pretrained"
    else:
        state, weights, step = random_state(config, mesh), "random", 0
    jax.block_until_ready(state)
    state_s = time.perf_counter() - start

    start = time.perf_counter()
    examples = sources.load_examples(config, config.eval.split, config.eval.max_images)
    read_s = time.perf_counter() - start

    run = evaluate.scorer(config, state, mesh)
    threshold, _ = evaluate.resolve_threshold(
        config.eval.threshold,
        Path(workdir),
        step,
        evaluate.predictor_settings(config, "eval"),
    )

    def predict_and_score() -> tuple[dict, float]:
        start = time.perf_counter()
        summary = run(examples, threshold=threshold).summary
        return summary, time.perf_counter() - start

    summary, predict_s = predict_and_score()
    line = (
        f"eval split={config.eval.split} images={summary['num_images']} "
        f"backbone={config.model.backbone} image_size={config.eval.image_size} "
        f"batch={config.eval.batch_size} weights={weights} read_s={read_s:.2f} "
        f"state_s={state_s:.2f} predict_score_s={predict_s:.2f} "
        f"total_s={read_s + state_s + predict_s:.2f}"
    )
    if warm_pass:
        line += f" predict_score_warm_s={predict_and_score()[1]:.2f}"
    return (
        f"{line} dice={summary['dice']:.4f} pooled_dice={summary['pooled_dice']:.4f} "
        f"devices={jax.device_count()}x{jax.devices()[0].device_kind} host_cores={os.cpu_count()}"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
