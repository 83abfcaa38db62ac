"""Exports a workdir's best checkpoint as a TensorFlow SavedModel (jax2tf, native serialization).

Usage:
    python -m hairseg_jax.export --workdir=runs/x --out=exported/ [--platforms=cpu,cuda]
        [--config=configs/figaro.py [--config.predict.tta=flip ...]]

Without --config the workdir's config.json (written by training) describes the model. The
SavedModel's ``serving_default`` signature takes ``images``: uint8 RGB (batch, height, width, 3)
with every dimension free (one batch shares one size), and returns ``probability``: float32
(batch, height, width), the hair probability at the input's own size. Preprocessing is inside:
each image is resized to the ``predict.image_size`` (else ``eval.image_size``) square, as
evaluation does, normalised, run through the model (with ``predict.tta``), and the logits are
resized back. ``hairseg.json`` beside it records the threshold (``predict.threshold`` if set,
else the tuned one if the workdir has one for this checkpoint, else 0.5), the sizes and the
step. Decoding is not inside: the images are the upright, opaque RGB that predict's
``read_photo`` gives (EXIF orientation applied, transparency over white).
"""

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from hairseg_jax import cli, config_checks, evaluate, files, models, sharding, steps

POLYMORPHIC_SHAPE = "(b, h, w, 3)"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax2tf's native serialization platforms
STAGING_PREFIX = ".export-"  # of the folder a SavedModel is written into before ``out``


def serving_function(config: ml_collections.ConfigDict) -> Callable[[Any, jax.Array], jax.Array]:
    """``(variables, uint8 images (B, H, W, 3)) -> float32 hair probability (B, H, W)``.

    Pure JAX and shape polymorphic: resizes to the model size (antialiased bilinear, rounded to
    uint8 like the host-side eval resize), normalises, predicts with ``config.predict.tta``
    and resizes the logits back bilinearly before the sigmoid.
    """
    model = models.build_model(config.model)
    size = evaluate.predictor_settings(config, "predict")["image_size"]
    preprocess = steps.preprocess_fn(config)
    tta = config.predict.tta

    def serve(variables: Any, images: jax.Array) -> jax.Array:
        batch, height, width, _ = images.shape
        resized = jax.image.resize(
            images.astype(jnp.float32), (batch, size, size, 3), "linear", antialias=True
        )
        resized = jnp.round(jnp.clip(resized, 0.0, 255.0))
        logits = steps.tta_logits(model.apply, variables, preprocess(resized), tta)
        logits = jax.image.resize(logits[..., 0], (batch, height, width), "linear")
        return jax.nn.sigmoid(logits)

    return serve


def export(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> dict[str, Any]:
    """Writes the SavedModel of ``workdir``'s best checkpoint (else ``config.model.pretrained``)
    to ``out`` and returns what ``out/hairseg.json`` records."""
    import tensorflow as tf  # only the export needs TensorFlow
    from jax.experimental import jax2tf

    tf.config.set_visible_devices([], "GPU")
    workdir = Path(workdir)
    state, weights, step = evaluate.load_state(
        config, workdir, sharding.data_mesh(jax.devices()[:1])
    )
    out = config_checks.make_folder(out, "--out")  # before the conversion, the long part
    settings = evaluate.predictor_settings(config, "predict")
    threshold, source = evaluate.resolve_threshold(
        config.predict.threshold,
        workdir,
        step,
        settings,
        digest=functools.partial(evaluate.weights_digest, state),
    )
    variables = jax.device_get(steps.inference_variables(state))

    converted = jax2tf.convert(
        serving_function(config),
        polymorphic_shapes=[None, POLYMORPHIC_SHAPE],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(x, trainable=False), variables
    )
    module.threshold = tf.Variable(threshold, trainable=False, dtype=tf.float32)

    @tf.function(
        autograph=False,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
    )
    def serving_default(images):
        return {"probability": converted(module.variables_tree, images)}

    module.serving_default = serving_default
    record = {
        "weights": weights,
        "step": step,
        "threshold": threshold,
        "threshold_source": source,
        "image_size": settings["image_size"],
        "tta": config.predict.tta,
        "input": "images: uint8 RGB (batch, height, width, 3)",
        "output": "probability: float32 (batch, height, width); hair where > threshold",
        "platforms": list(platforms),
    }
    # Written into a folder of its own first: a failure (a full disk) leaves ``out`` as it was.
    # One that a killed export left behind is deleted.
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        logging.info("Deleting %s, left by an export that did not end.", stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        try:
            signatures = {"serving_default": serving_default}
            tf.saved_model.save(module, str(staging), signatures=signatures)
        except tf.errors.OpError as e:  # TensorFlow's own, e.g. ResourceExhaustedError
            raise OSError(f"Cannot write the SavedModel to {out}: {e.message}") from e
        files.write_json(staging / "hairseg.json", record)
        move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info("Exported %s to %s: %s", weights, out, record)
    return record


def move_into(staging: Path, out: Path) -> None:
    """Moves the SavedModel in ``staging`` into ``out``, replacing the entries of the same
    names (others stay), so that ``out`` never holds parts of two models: the old graph
    (``saved_model.pb``) goes first, so nothing loads from ``out`` while it changes, and the new
    one comes last, after its variables."""
    (out / "saved_model.pb").unlink(missing_ok=True)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "saved_model.pb"):
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)


# Config fields that export checks or reads, added since training first wrote config.json,
# with the values that runs before them had.
ADDED_FIELDS = {
    "data": {"progressive_sizes": (), "progressive_until": ()},
    "augment": {"device_max_side": 512},
    "eval": {"tta_sizes": ()},
}


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config training saved in ``workdir/config.json``."""
    saved = config_checks.saved_config(workdir)
    if saved is None:
        raise FileNotFoundError(
            f"{workdir / 'config.json'} does not exist; pass --config=... for this workdir."
        )
    for group, defaults in ADDED_FIELDS.items():  # a workdir trained by an older version
        saved[group] = defaults | saved.get(group, {})
    return ml_collections.ConfigDict(saved)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_libraries()
    with cli.ending_on_ctrl_c("while exporting"):
        try:
            workdir = config_checks.folder_flag(FLAGS.workdir, "--workdir")
            out = config_checks.folder_flag(FLAGS.out, "--out")
            if not workdir.is_dir():
                raise FileNotFoundError(f"--workdir={FLAGS.workdir} is not a folder.")
            config = FLAGS.config or read_config(workdir)
            config_checks.expand_user(config)
            config_checks.check_config(config)
            sharding.start_backend()
            export(config, workdir, out, FLAGS.platforms)
        except config_checks.USER_ERRORS as e:
            sys.exit(f"FATAL {e}")


if __name__ == "__main__":
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("workdir", None, "Workdir whose best checkpoint is exported.")
    flags.DEFINE_string("out", None, "Folder of the SavedModel.")
    flags.DEFINE_list("platforms", ["cpu", "cuda"], "Platforms the SavedModel can run on.")
    flags.register_validator(
        "platforms",
        lambda names: bool(names) and set(names) <= set(PLATFORMS),
        f"--platforms must name some of {', '.join(PLATFORMS)}.",
    )
    config_flags.DEFINE_config_file(
        "config", None, "Config file (default: the workdir's config.json).", lock_config=True
    )
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main, flags_parser=cli.parse_flags)
