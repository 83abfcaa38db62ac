"""Export: the SavedModel, loaded by plain TensorFlow, gives the JAX model's probabilities."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import figaro
from hairseg_jax import checkpoints, config_checks, evaluate, export, files, models, sharding, steps
from hairseg_jax.data import whole_images
from tests.conftest import random_variables, run_python, run_without_backend

SIZE = 64
STEP = 4
THRESHOLD = 0.35
FRAMES = ("Frame00005-org.jpg", "Frame00160-org.jpg", "Frame00900-org.jpg")


def tiny_config():
    config = figaro.get_config("smoke")
    config.model.aspp_channels = 8
    config.model.decoder_channels = 8
    config.eval.image_size = SIZE
    config.predict.tta = "flip"
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Random tiny variables as the best checkpoint, config.json and a tuned threshold."""
    workdir = tmp_path_factory.mktemp("export_workdir")
    config = tiny_config()
    best = checkpoints.best_manager(workdir)
    variables = random_variables(models.build_model(config.model), SIZE, seed=1)
    checkpoints.save(best, STEP, variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    files.write_json(workdir / evaluate.THRESHOLD_FILE, {"threshold": THRESHOLD, "step": STEP})
    return workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> Path:
    """``python -m hairseg_jax.export`` run on the workdir (its config.json)."""
    out = tmp_path_factory.mktemp("exported") / "model"
    result = run_python("-m", "hairseg_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def photos(figaro_dir) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(figaro_dir / "GT" / "images" / frame).convert("RGB"))
        for frame in FRAMES
    ]


def test_saved_model_matches_the_jax_model_on_real_images(workdir, exported, photos):
    config = export.read_config(workdir)
    state, _, _ = evaluate.load_state(config, workdir, sharding.data_mesh())
    variables = jax.device_get(steps.inference_variables(state))
    serve = jax.jit(export.serving_function(config))
    serving = tf.saved_model.load(str(exported)).signatures["serving_default"]

    crop = min(p.shape[0] for p in photos), min(p.shape[1] for p in photos)
    images = np.stack([p[: crop[0], : crop[1]] for p in photos])  # a batch of three
    probability = serving(images=tf.constant(images))["probability"].numpy()
    expected = np.asarray(serve(variables, images))
    assert probability.shape == expected.shape == images.shape[:3]
    assert np.abs(probability - expected).max() <= 1e-4
    # The masks at a threshold that cuts this random model's output in half agree but for
    # ties (its probabilities hover around 0.5 and vary by a few hundredths).
    cut = np.median(expected)
    differ = (probability > cut) != (expected > cut)
    assert (np.abs(expected[differ] - cut) <= 1e-4).all()
    assert expected.max() - expected.min() > 1e-3

    # One photo of another size (the signature's shapes are free): the in-graph preprocessing
    # is predict mode's, the same mask to within resize rounding. (Each shape costs a compile
    # in TensorFlow and in JAX, so the exact comparison above is made at one shape.)
    predict_fn = steps.jit_predict(config, tta="flip")
    image = photos[0]
    logits = np.asarray(predict_fn(state, whole_images.resize_image(image, SIZE)[None]))[0]
    host = 1 / (1 + np.exp(-evaluate.resize_logits(logits, *image.shape[:2])[..., 0]))
    graph = serving(images=tf.constant(image[None]))["probability"].numpy()[0]
    assert graph.shape == host.shape == image.shape[:2]
    cut = np.median(graph)
    assert ((host > cut) == (graph > cut)).mean() > 0.999


def test_signature_and_record(exported):
    loaded = tf.saved_model.load(str(exported))
    _, inputs = loaded.signatures["serving_default"].structured_input_signature
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, None, None, 3]
    assert float(loaded.threshold.numpy()) == pytest.approx(THRESHOLD)
    record = json.loads((exported / "hairseg.json").read_text())
    assert record["threshold"] == THRESHOLD and record["threshold_source"] == "tuned"
    assert (record["step"], record["image_size"], record["tta"]) == (STEP, SIZE, "flip")
    assert record["platforms"] == ["cpu", "cuda"]  # the default: lowered for both


def test_unreadable_saved_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model": ')  # cut short by a full disk
    with pytest.raises(config_checks.ConfigError, match="config.json is not readable JSON"):
        export.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")  # JSON, but no config
    with pytest.raises(config_checks.ConfigError, match="config.json is not a config"):
        export.read_config(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--platforms=tpuu"], "--platforms must name some of cpu, cuda, rocm, tpu."),
        (
            ["--config=configs/figaro.py:smoke", "--config.predict.ttaa=flip"],
            "Bad config override (--config.predict.ttaa=flip): no such field 'ttaa'",
        ),
        (
            ["--config.predict.tta=flip"],  # overrides without --config: nothing to override
            "--config.* overrides need a --config file to override",
        ),
        (["--out="], "FATAL --out is empty: it must name a folder."),  # an unset variable
        (["--workdir={tmp}/gone"], "FATAL --workdir={tmp}/gone is not a folder."),
    ],
)
def test_bad_flags_give_one_clear_line_before_any_work(args, message, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_python(
        "-m", "hairseg_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}", *args
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message.format(tmp=tmp_path) in result.stderr and not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_made_is_named_before_the_conversion(workdir, tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    with pytest.raises(config_checks.ConfigError, match="--out=.* cannot be made a folder"):
        export.export(export.read_config(workdir), workdir, taken)


def test_an_export_that_fails_leaves_out_as_it_was(workdir, tmp_path, monkeypatch):
    """A full disk halfway through the SavedModel: nothing of it is left in --out, nor of an
    export killed there before."""
    out = tmp_path / "out"
    (out / f"{export.STAGING_PREFIX}k1ll3d" / "variables").mkdir(parents=True)
    (out / f"{export.STAGING_PREFIX}k1ll3d" / "variables" / "variables.data").write_bytes(b"x")
    (out / "older.txt").write_text("kept")

    def full_disk(module, path, signatures):
        (Path(path) / "saved_model.pb.tmp0123").write_bytes(b"partial")
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full_disk)
    with pytest.raises(OSError, match=f"^Cannot write the SavedModel to {out}: No space left"):
        export.export(export.read_config(workdir), workdir, out)
    assert [p.name for p in out.iterdir()] == ["older.txt"]


def test_a_new_saved_model_replaces_the_old_without_a_mix_of_the_two(tmp_path, monkeypatch):
    """The old graph goes first and the new one comes last: a kill in between leaves --out
    unloadable, never the new graph with the old variables (or the reverse)."""
    staging, out = tmp_path / "staging", tmp_path / "out"
    for folder, version in ((out, "old"), (staging, "new")):
        (folder / "variables").mkdir(parents=True)
        for name in ("saved_model.pb", "fingerprint.pb", "hairseg.json", "variables/data"):
            (folder / name).write_text(version)
    (out / "notes.txt").write_text("the user's")
    events = []
    real_replace, real_unlink = export.os.replace, Path.unlink
    monkeypatch.setattr(
        export.os,
        "replace",
        lambda a, b: events.append(("new", Path(b).name)) or real_replace(a, b),
    )
    monkeypatch.setattr(
        Path, "unlink", lambda p, **kw: events.append(("gone", p.name)) or real_unlink(p, **kw)
    )
    export.move_into(staging, out)
    assert events[0] == ("gone", "saved_model.pb") and events[-1] == ("new", "saved_model.pb")
    assert {name for _, name in events} == {
        "saved_model.pb",
        "fingerprint.pb",
        "hairseg.json",
        "variables",
    }
    for name in ("saved_model.pb", "fingerprint.pb", "hairseg.json", "variables/data"):
        assert (out / name).read_text() == "new", name
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_config_saved_by_an_older_version_gets_the_fields_added_since(tmp_path):
    saved = json.loads(tiny_config().to_json_best_effort())
    for group, defaults in export.ADDED_FIELDS.items():
        for field in defaults:
            del saved[group][field]
    files.write_json(tmp_path / "config.json", saved)
    config = export.read_config(tmp_path)
    config_checks.check_config(config)
    for group, defaults in export.ADDED_FIELDS.items():
        assert {field: config[group][field] for field in defaults} == defaults
    saved["augment"]["device_max_side"] = 384  # a field added since, which it has: kept
    files.write_json(tmp_path / "config.json", saved)
    assert export.read_config(tmp_path).augment.device_max_side == 384


def test_a_configured_threshold_is_the_one_recorded(workdir, tmp_path, monkeypatch):
    """``predict.threshold`` set: it, not the workdir's tuned one, is the export's."""
    monkeypatch.setattr(tf.saved_model, "save", lambda module, path, signatures: None)
    config = tiny_config()
    config.predict.threshold = 0.6
    record = export.export(config, workdir, tmp_path / "out")
    assert (record["threshold"], record["threshold_source"]) == (0.6, "config")
    assert json.loads((tmp_path / "out" / "hairseg.json").read_text())["threshold"] == 0.6


def test_a_damaged_checkpoint_is_one_fatal_line(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort(indent=2))
    with checkpoints.closed_after(checkpoints.best_manager(tmp_path)) as best:
        checkpoints.save(best, 5, {"w": np.ones(2, np.float32)}, metrics={"dice": 0.25})
    (tmp_path / "best" / "5" / "metrics" / "metrics").write_text('{"dice": 0.2')
    out = tmp_path / "out"
    result = run_python("-m", "hairseg_jax.export", f"--workdir={tmp_path}", f"--out={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"FATAL The checkpoint at step 5 of {tmp_path / 'best'} cannot be read (")
    )


def test_a_backend_that_cannot_start_is_one_fatal_line(workdir, tmp_path):
    """As main.py does; it was JAX's bare AssertionError and 30 lines of traceback."""
    run_without_backend(
        "-m", "hairseg_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'out'}"
    )
