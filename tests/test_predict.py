"""Predict mode: masks and overlays for a folder of mixed, odd and broken images."""

import errno
import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import figaro
from hairseg_jax import (
    checkpoints,
    config_checks,
    evaluate,
    files,
    models,
    pictures,
    predict,
    sharding,
    steps,
)
from hairseg_jax.data.examples import Examples
from tests.conftest import random_variables, run_python

SIZE = 64
PREDICT_SIZE = 48  # predict.image_size, when not eval's
STEP = 5
OVERRIDES = {
    "model.aspp_channels": 8,
    "model.decoder_channels": 8,
    "eval.image_size": SIZE,
    "predict.batch_size": 4,
}
FRAMES = ("Frame00001-org.jpg", "Frame00002-org.jpg", "Frame00160-org.jpg")
LONG_NAME = "p" * 226  # with "_overlay.jpg", 238 of the 255 bytes a name may have


def tiny_config():
    config = figaro.get_config("smoke")
    for field, value in OVERRIDES.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A workdir whose best checkpoint (step 5) holds random tiny variables."""
    workdir = tmp_path_factory.mktemp("predict_workdir")
    variables = random_variables(models.build_model(tiny_config().model), SIZE)
    best = checkpoints.best_manager(workdir)
    checkpoints.save(best, STEP, variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    return workdir


@pytest.fixture(scope="module")
def inputs(figaro_dir, tmp_path_factory) -> Path:
    """Real photos, the odd formats and sizes people have, and two unreadable files."""
    folder = tmp_path_factory.mktemp("inputs")
    for frame in FRAMES:
        (folder / frame).write_bytes((figaro_dir / "GT" / "images" / frame).read_bytes())
    photo = Image.open(folder / FRAMES[0]).convert("RGB")
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 3, 3] = 0
    Image.fromarray(rgba).save(folder / "alpha.png")
    photo.convert("L").save(folder / "grey.png")
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(
        folder / "grey16.png"
    )
    photo.resize((8, 8)).save(folder / "tiny.png")
    photo.save(folder / "photo.webp")
    photo.save(folder / "photo.bmp")
    # A lossless copy of the first photo that sorts between the two unreadable files, so it
    # shares a batch with them, behind one: its mask must still be that photo's.
    photo.save(folder / "d_copy.bmp")
    large = Image.new("RGB", (4000, 3000), (120, 90, 60))
    large.paste((255, 0, 0), (0, 0, 400, 400))  # stored top left: displayed top right
    exif = large.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display (portrait 3000x4000)
    large.save(folder / "large.jpg", exif=exif, quality=80)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all" * 8)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not an input\n")
    (folder / "._tiny.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata, not an input")
    photo.resize((8, 8)).save(folder / f"{LONG_NAME}.png")  # its outputs' names just fit
    # Readable, but too wide for its JPEG overlay: its mask is written, then it fails alone.
    Image.new("RGB", (70000, 2), (120, 90, 60)).save(folder / "wide.png")
    return folder


EXPECTED_SIZES = {  # output name -> (width, height) of the mask
    "Frame00001-org": None,  # the photo's own size, filled in from the file
    "Frame00002-org": None,
    "Frame00160-org": None,
    "alpha": "Frame00001-org",
    "grey": "Frame00001-org",
    "grey16": "Frame00001-org",
    "photo_webp": "Frame00001-org",
    "photo_bmp": "Frame00001-org",
    "d_copy": "Frame00001-org",
    "tiny": (8, 8),
    LONG_NAME: (8, 8),
    "large": (3000, 4000),
}


def run_predict(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    overrides = [f"--config.{field}={value}" for field, value in OVERRIDES.items()]
    return run_python(
        "main.py",
        "--config=configs/figaro.py:smoke",
        f"--workdir={workdir}",
        "--config.mode=predict",
        *overrides,
        *args,
    )


def test_mixed_folder_gets_masks_and_reports_unreadable_files(workdir, inputs, tmp_path):
    out = tmp_path / "out"
    result = run_predict(
        workdir,
        f"--config.predict.input={inputs}",
        f"--config.predict.output={out}",
        "--config.predict.save_prob=png",
    )

    assert result.returncode == 3, result.stderr[-3000:]  # three files could not be predicted
    assert "FATAL 3 of 15 input files could not be predicted" in result.stderr
    for bad, why in (
        ("corrupt.jpg", "cannot read it"),
        ("empty.png", "cannot read it"),
        ("wide.png", "cannot write its outputs (ValueError: the overlay's 70000x2 px exceed"),
    ):
        lines = [line for line in result.stderr.splitlines() if f"Skipping {inputs / bad}" in line]
        assert len(lines) == 1 and why in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # The last progress line waits for the last writes (it said "2 failed", then wide.png failed).
    progress = [line for line in result.stderr.splitlines() if "] Predict: " in line]
    assert "] Predict: 15/15 files (3 failed), " in progress[-1] and "ETA 0 s." in progress[-1]

    for name, size in EXPECTED_SIZES.items():
        if size is None:
            size = Image.open(inputs / f"{name}.jpg").size
        elif isinstance(size, str):
            size = Image.open(inputs / f"{size}.jpg").size
        with Image.open(out / f"{name}_mask.png") as mask:
            assert mask.size == size and mask.mode == "L", name
            assert set(np.unique(np.asarray(mask))) <= {0, 255}, name
        with Image.open(out / f"{name}_overlay.jpg") as overlay:
            assert overlay.size == size and overlay.mode == "RGB", name
        with Image.open(out / f"{name}_prob.png") as prob:
            assert prob.size == size, name
            is_hair = np.asarray(Image.open(out / f"{name}_mask.png")) > 0
            np.testing.assert_array_equal(np.asarray(prob) >= 128, is_hair, err_msg=name)
    written = {p.name.rsplit("_", 1)[0] for p in out.iterdir()}
    assert written == {*EXPECTED_SIZES, "wide"}  # nothing for the corrupt, empty or text files
    assert sorted(p.name for p in out.glob("wide*")) == ["wide_mask.png", "wide_prob.png"]
    # Each mask is its own image's, whatever failed beside it in its batch.
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "d_copy_prob.png")),
        np.asarray(Image.open(out / "Frame00001-org_prob.png")),
    )


def test_predict_uses_the_tuned_threshold_tta_and_matches_eval(workdir, inputs, tmp_path):
    """In process, on a glob, at its own size, in two batches (the last one short): the masks
    are eval's predictions at the tuned threshold, the overlays tint them."""
    files.write_json(workdir / evaluate.THRESHOLD_FILE, {"threshold": 0.45, "step": STEP})
    config = tiny_config()
    config.predict.input = str(inputs / "Frame*.jpg")
    config.predict.output = str(tmp_path / "out")
    config.predict.tta = "flip"
    config.predict.save_prob = "npy"
    config.predict.image_size, config.predict.batch_size = PREDICT_SIZE, 2
    try:
        summary = predict.predict(config, workdir)
    finally:
        (workdir / evaluate.THRESHOLD_FILE).unlink()

    assert summary["num_files"] == summary["num_written"] == len(FRAMES)
    assert summary["failed"] == []
    assert (summary["threshold"], summary["threshold_source"]) == (0.45, "tuned")
    photos = [predict.read_photo(inputs / frame) for frame in FRAMES]
    examples = Examples(list(FRAMES), photos, [np.zeros(p.shape[:2], np.uint8) for p in photos])
    mesh = sharding.data_mesh()
    state, _, _ = evaluate.load_state(config, workdir, mesh)
    predict_fn = steps.jit_predict(config, mesh, tta="flip")
    for index, logits in evaluate.full_resolution_logits(
        predict_fn, state, examples, PREDICT_SIZE, 2, mesh
    ):
        name = FRAMES[index].removesuffix(".jpg")
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png")) > 0
        np.testing.assert_array_equal(mask, logits[..., 0] > evaluate.logit(0.45))
        assert 0.01 < mask.mean() < 0.99, name  # a mask to tint, not a blank one
        prob = np.load(tmp_path / "out" / f"{name}_prob.npy")
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logits[..., 0])), atol=1e-6)
        overlay = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.jpg"), np.float32)
        tinted = pictures.tint(photos[index], mask)
        assert np.abs(overlay - tinted).mean() < 3  # JPEG quality 90
        assert np.abs(overlay - photos[index])[mask].mean() > 20  # tinted where hair


@pytest.mark.parametrize("process", [0, 1])
def test_output_that_cannot_be_a_folder_is_named(workdir, inputs, tmp_path, monkeypatch, process):
    """By every process: process 0 stopping alone left the others waiting for it."""
    monkeypatch.setattr(predict.jax, "process_index", lambda: process)
    config = tiny_config()
    config.predict.input = str(inputs)
    config.predict.output = str(tmp_path / "taken")
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(config_checks.ConfigError, match="cannot be made a folder"):
        predict.predict(config, workdir)


def test_a_workdir_without_weights_makes_no_output_folder(inputs, tmp_path):
    config = tiny_config()
    config.predict.input, config.predict.output = str(inputs), str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="No best checkpoint"):
        predict.predict(config, tmp_path / "untrained")
    assert not (tmp_path / "out").exists()


def test_read_photo_applies_exif_orientation_alpha_and_16_bit(inputs, tmp_path):
    large = predict.read_photo(inputs / "large.jpg")
    assert large.shape == (4000, 3000, 3)
    red = large[:300, -300:]  # the stored top left, turned clockwise
    assert (red[..., 0] > 230).all() and (red[..., 1:] < 30).all()
    assert (large[:300, :300, 0] < 150).all()
    alpha = predict.read_photo(inputs / "alpha.png")
    assert (alpha[:, : alpha.shape[1] // 3 - 1] == 255).all()  # transparent -> white
    grey = predict.read_photo(inputs / "grey.png")
    np.testing.assert_array_equal(predict.read_photo(inputs / "grey16.png"), grey)
    # 16-bit grey with one transparent value (a PNG tRNS chunk): reduced to 8 bits, not clipped
    grey16 = np.asarray(Image.open(inputs / "grey16.png")).astype(np.uint16)
    clear = grey16[0, 0]
    Image.fromarray(grey16).save(tmp_path / "clear.png", transparency=int(clear))
    expected = np.where((grey16 == clear)[..., None], np.uint8(255), grey)
    np.testing.assert_array_equal(predict.read_photo(tmp_path / "clear.png"), expected)
    assert predict.read_photo(inputs / "tiny.png").shape == (8, 8, 3)


def test_broken_links_are_inputs_to_report_not_to_pass_over(tmp_path):
    """A link to nothing (or to itself) is an input that cannot be read, counted in the exit
    status, rather than silently left out; a FIFO is still no file (reading it would block)."""
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    found = predict.find_inputs(str(tmp_path))
    assert [p.name for p in found] == ["a.jpg", "gone.jpg", "loop.jpg"]
    assert predict.find_inputs(str(tmp_path / "gone.jpg")) == [tmp_path / "gone.jpg"]
    with pytest.raises(OSError):
        predict.read_photo(tmp_path / "gone.jpg")


def test_inputs_and_output_names(inputs, tmp_path):
    folder = predict.find_inputs(str(inputs))
    assert [p.name for p in folder][:3] == list(FRAMES) and len(folder) == 15
    assert predict.find_inputs(str(inputs / "*")) == folder  # no text, no hidden file
    assert predict.find_inputs(str(inputs / "*.png")) == sorted(inputs.glob("[!.]*.png"))
    assert predict.find_inputs(str(inputs / "tiny.png")) == [inputs / "tiny.png"]
    with pytest.raises(FileNotFoundError, match="No images at"):
        predict.find_inputs(str(tmp_path / "nothing*.jpg"))
    names = predict.output_names([Path("a/x.jpg"), Path("b/x.png"), Path("c/x.jpg"), Path("y.jpg")])
    assert names == ["x_jpg", "x_png", "x_jpg_2", "y"]
    assert predict.output_names([Path("a/x.jpg"), Path("b/x.png")]) == ["x_jpg", "x_png"]


def test_a_photos_own_stem_is_never_another_photos_output_name():
    """a_jpg.png's outputs were a_jpg_2_*, and a_jpg_* those of d1/a.jpg; B.JPG and b.jpg were
    B_* and b_*, one file on a disk blind to case (a Mac's, Windows')."""
    files = [Path(p) for p in ("d1/a.jpg", "d1/a.png", "d1/a_jpg.png", "d2/a.jpg", "d1/b.jpg")]
    assert predict.output_names(files) == ["a_jpg_2", "a_png", "a_jpg", "a_jpg_3", "b"]
    assert predict.output_names([Path("B.JPG"), Path("b.jpg")]) == ["B_JPG", "b_jpg_2"]


def test_earlier_outputs_in_the_output_folder_are_not_inputs(tmp_path, caplog):
    """Predicting a folder into itself twice does not predict its own masks, and nor does
    predicting that folder into another one later, nor a pattern that reaches the folder
    where an earlier run wrote the outputs of its images."""
    names = ("a.jpg", "a_mask.png", "a_overlay.jpg", "a_prob.png", "a_prob.npy", "b_mask.png.jpg")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c_mask.png").write_bytes(b"")  # no c.* among the inputs: a photo
    (tmp_path / "masks").mkdir()  # an earlier run's output folder, which ** reaches
    for name in ("a_mask.png", "a_overlay.jpg", "e_png_prob.png"):
        (tmp_path / "masks" / name).write_bytes(b"")
    once = ("d.jpg", "d_mask.png", "d_overlay.jpg", "e.png", "e.jpg", "e_png_prob.npy")
    (tmp_path / "once_its_own_output").mkdir()
    for name in once:
        (tmp_path / "once_its_own_output" / name).write_bytes(b"")
    found = predict.find_inputs(str(tmp_path / "**" / "*.*"))
    with caplog.at_level(logging.INFO):
        kept = predict.without_outputs(found, tmp_path)
    assert (  # by name: a photo so named would be left out and overwritten, so they are named
        f"Leaving out 8 files named as the outputs of an earlier run: {tmp_path / 'a_mask.png'}, "
    ) in caplog.text
    assert [p.relative_to(tmp_path).as_posix() for p in kept] == [
        "a.jpg",
        "b_mask.png.jpg",
        "once_its_own_output/d.jpg",
        "once_its_own_output/e.jpg",
        "once_its_own_output/e.png",
        "other/c_mask.png",
    ]
    elsewhere = predict.without_outputs(found, tmp_path / "new_output")
    assert [p.relative_to(tmp_path).as_posix() for p in elsewhere] == [
        "a.jpg",  # its outputs beside it are left out as well
        "b_mask.png.jpg",
        "once_its_own_output/d.jpg",
        "once_its_own_output/e.jpg",
        "once_its_own_output/e.png",
        "other/c_mask.png",
    ]
    with pytest.raises(FileNotFoundError, match="The only images .* are outputs in"):
        predict.without_outputs([tmp_path / "a_mask.png"], tmp_path)


def test_earlier_outputs_with_a_counter_in_their_names_are_not_inputs(tmp_path):
    """A second a.jpg's outputs, a_jpg_2_*, in an earlier output folder that ** reaches: they
    were predicted as photos (a_jpg_2_mask_mask.png, ...)."""
    for name in ("d1/a.jpg", "d1/a.png", "d2/a.jpg", "out/a_jpg_2_mask.png", "out/a_png_mask.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = predict.find_inputs(str(tmp_path / "**" / "*"))
    kept = predict.without_outputs(found, tmp_path / "elsewhere")
    assert [p.relative_to(tmp_path).as_posix() for p in kept] == [
        "d1/a.jpg",
        "d1/a.png",
        "d2/a.jpg",
    ]


def test_threshold_json_of_another_step_or_predictor_is_ignored(tmp_path, caplog):
    plain = evaluate.predictor_settings(tiny_config(), "predict")
    record = {"threshold": 0.3, "step": 7} | plain
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, record | {"num_images": 8})
    with caplog.at_level(logging.INFO):
        assert evaluate.resolve_threshold(-1, tmp_path, 7, plain) == (0.3, "tuned")
    assert "Using threshold 0.3 of" in caplog.text and "tuned on 8 val images." in caplog.text
    assert evaluate.resolve_threshold(-1, tmp_path, 8, plain) == (0.5, "default")
    assert evaluate.resolve_threshold(0.6, tmp_path, 7, plain) == (0.6, "config")
    flipped = plain | {"tta": "flip"}  # tuned without TTA, predicting with it
    assert evaluate.resolve_threshold(-1, tmp_path, 7, flipped) == (0.5, "default")
    assert "rerun eval with --config.eval.tune_threshold=True and eval.image_size" in caplog.text
    larger = plain | {"image_size": plain["image_size"] + 32}
    assert evaluate.resolve_threshold(-1, tmp_path, 7, larger) == (0.5, "default")
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, record | {"tta_sizes": [64]})
    assert evaluate.resolve_threshold(-1, tmp_path, 7, plain) == (0.5, "default")  # multi-scale
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, record)
    assert evaluate.resolve_threshold(0.3, tmp_path, 7, plain) == (0.3, "config")  # below 0.5
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, {"threshold": 0.3, "step": 7})
    assert evaluate.resolve_threshold(-1, tmp_path, 7, flipped) == (0.3, "tuned")  # unrecorded
    just_tuned = {"threshold": 0.4, "step": 8}  # as tuned by this process, not read back
    assert evaluate.resolve_threshold(-1, tmp_path, 8, plain, just_tuned) == (0.4, "tuned")
    assert json.loads((tmp_path / evaluate.THRESHOLD_FILE).read_text())["threshold"] == 0.3
    assert [p.name for p in tmp_path.iterdir()] == [evaluate.THRESHOLD_FILE]  # no temp left
    # Other weights of the same step: another pretrained file (step 0), a workdir trained again.
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, record | {"weights_digest": "a1"})
    assert evaluate.resolve_threshold(-1, tmp_path, 7, plain, digest=lambda: "a1") == (0.3, "tuned")
    assert evaluate.resolve_threshold(-1, tmp_path, 7, plain, digest=lambda: "b2") == (
        0.5,
        "default",
    )
    assert "tuned for other weights of step 7" in caplog.text
    # Multi-scale sizes in another order average the same logits.
    config = tiny_config()
    config.eval.tta_sizes = (128, 64)
    assert evaluate.predictor_settings(config, "eval")["tta_sizes"] == [64, 128]


@pytest.mark.parametrize("threshold", [1.5, 1.0, 0.0])
def test_a_threshold_json_outside_0_1_is_named_as_such(tmp_path, caplog, threshold):
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, {"threshold": threshold, "step": 3})
    settings = evaluate.predictor_settings(tiny_config(), "predict")
    assert evaluate.resolve_threshold(-1, tmp_path, 3, settings) == (0.5, "default")
    assert f"unreadable (threshold {threshold} is not in (0, 1))" in caplog.text


def test_the_exit_status_counts_unreadable_files_up_to_100(workdir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(101):
        (broken / f"{i:03d}.png").write_bytes(b"not a PNG")
    result = run_predict(
        workdir, f"--config.predict.input={broken}", f"--config.predict.output={tmp_path / 'o'}"
    )
    assert result.returncode == 100 and "Traceback" not in result.stderr
    assert "FATAL 101 of 101 input files could not be predicted" in result.stderr


def test_an_image_that_cannot_be_written_fails_alone_but_a_full_disk_stops(tmp_path, monkeypatch):
    image, logits = np.zeros((2, 70000, 3), np.uint8), np.zeros((8, 8), np.float32)
    why = predict.write_or_explain(tmp_path, "wide", image, logits, 0.5, "png")
    assert why == "ValueError: the overlay's 70000x2 px exceed JPEG's 65500 px"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide_mask.png", "wide_prob.png"]
    assert predict.write_or_explain(tmp_path, "edge", image[:, :65500], logits, 0.5, "") == ""
    assert (tmp_path / "edge_overlay.jpg").is_file()  # JPEG's largest side

    def refused_name(path, data):  # as exFAT, FAT or SMB refuse a name with ":"
        raise OSError(errno.EINVAL, "Invalid argument", str(path))

    monkeypatch.setattr(files, "write_atomically", refused_name)
    why = predict.write_or_explain(tmp_path, "a:b", image[:, :8], logits, 0.5, "")
    assert why.startswith("OSError: [Errno 22] Invalid argument")

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_atomically", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        predict.write_or_explain(tmp_path, "small", image[:, :8], logits, 0.5, "")


def test_a_failure_in_the_first_batch_is_counted_and_only_process_0_writes(
    workdir, tmp_path, monkeypatch
):
    """One image a batch: the first one's outputs cannot be written (over JPEG's side), the
    second's are. As process 1 of a multi-process run, the same run writes nothing."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (70000, 2), (120, 90, 60)).save(folder / "a_wide.png")
    Image.new("RGB", (8, 8), (120, 90, 60)).save(folder / "tiny.png")
    config = tiny_config()
    config.predict.input, config.predict.output = str(folder), str(tmp_path / "out")
    config.predict.batch_size = 1
    summary = predict.predict(config, workdir)
    assert summary["failed"] == [str(folder / "a_wide.png")] and summary["num_written"] == 1
    assert predict.failure_line(summary) == (
        f"1 of 2 input files could not be predicted: {folder / 'a_wide.png'}"
    )
    many = {"failed": list("abcdef"), "num_files": 9}
    assert predict.failure_line(many) == (
        "6 of 9 input files could not be predicted: a, b, c, d, e and 1 more"
    )
    assert predict.failure_line(many | {"failed": list("abcde")}).endswith(": a, b, c, d, e")
    odd = {"failed": ["in/new\nline.jpg", "in/tab\there.jpg", "in/é.jpg"], "num_files": 3}
    assert predict.failure_line(odd) == (  # one line, the names' letters as they are
        "3 of 3 input files could not be predicted: in/new\\nline.jpg, in/tab\\there.jpg, in/é.jpg"
    )

    config.predict.output = str(tmp_path / "out_of_process_1")
    monkeypatch.setattr(predict.jax, "process_index", lambda: 1)
    predict.predict(config, workdir)
    assert list((tmp_path / "out_of_process_1").iterdir()) == []


def test_a_files_warnings_name_it_each_time(workdir, tmp_path, monkeypatch, caplog):
    """Pillow's decompression-bomb warning, for each of two files, names the file (Python
    would print it once, naming Pillow's source line); other warnings are left as they were."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(folder / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a warning above it, an error at 2x
    config = tiny_config()
    config.predict.input, config.predict.output = str(folder), str(tmp_path / "out")
    show = warnings.showwarning
    with caplog.at_level(logging.WARNING):
        summary = predict.predict(config, workdir)
    assert summary["num_written"] == 2 and not summary["failed"]
    bomb = (
        "DecompressionBombWarning: Image size (1200 pixels) exceeds limit of 1000 pixels, "
        "could be decompression bomb DOS attack."
    )
    named = sorted(r.getMessage() for r in caplog.records if "Bomb" in r.getMessage())
    assert named == [f"{folder / name}: {bomb}" for name in ("a.png", "b.png")]
    assert warnings.showwarning is show


def test_running_out_of_host_memory_stops_instead_of_blaming_each_file(workdir, inputs, tmp_path):
    """As NumPy's for a mistyped predict.image_size=100000: main names it in one line."""
    config = tiny_config()
    config.predict.input, config.predict.output = str(inputs / "tiny.png"), str(tmp_path / "o")
    config.predict.image_size = 100000
    with pytest.raises(MemoryError):
        predict.predict(config, workdir)


def test_the_log_names_the_outputs_of_each_renamed_photo(workdir, tmp_path, caplog):
    """The log was the only place to learn which a.png became a_png_2, and it did not say."""
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (12, 10)).save(tmp_path / folder / "a.png")
    Image.new("RGB", (12, 10)).save(tmp_path / "x" / "b.png")
    config = tiny_config()
    config.predict.input = str(tmp_path / "**" / "*.png")
    config.predict.output = str(tmp_path / "out")
    with caplog.at_level(logging.INFO):
        predict.predict(config, workdir)
    renamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("The outputs")]
    assert renamed == [
        f"The outputs of {tmp_path / 'x' / 'a.png'} are named a_png_*.",
        f"The outputs of {tmp_path / 'y' / 'a.png'} are named a_png_2_*.",
    ]
    assert (tmp_path / "out" / "a_png_2_mask.png").is_file()
