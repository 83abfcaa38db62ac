"""Tests of the stratified Figaro1k split and its CLI."""

import json
import subprocess
from pathlib import Path

import pytest

from hairseg_jax import files
from hairseg_jax.data import split
from hairseg_jax.data.figaro1k import HAIR_TYPES, hair_type
from hairseg_jax.data.split import bare_frame, split_to_json, stratified_split
from tests.conftest import run_python

SYNTHETIC_FRAMES = [f"Frame{i:05d}-org.jpg" for i in range(1, 1051)]


@pytest.fixture(params=["real", "synthetic"])
def frames(request: pytest.FixtureRequest) -> list[str]:
    """Image names of the real Figaro1k, or the 1050 names it would have."""
    if request.param == "synthetic":
        return SYNTHETIC_FRAMES
    images = request.getfixturevalue("figaro_dir") / "GT" / "images"
    names = sorted(p.name for p in images.glob("*-org.jpg"))
    assert len(names) == 1050, f"expected 1050 images in {images}, found {len(names)}"
    return names


def test_default_split(frames: list[str]):
    split = stratified_split(frames)
    assert list(split) == ["train", "val", "test"]
    assert [len(v) for v in split.values()] == [735, 210, 105]
    names = [n for v in split.values() for n in v]
    assert sorted(names) == sorted(bare_frame(f) for f in frames)  # complete and disjoint
    for fraction, part in zip((0.7, 0.2, 0.1), split.values(), strict=True):
        assert part == sorted(part)
        types = [hair_type(n) for n in part]
        for kind in HAIR_TYPES:
            assert abs(types.count(kind) - fraction * 150) <= 1, (kind, fraction)


@pytest.mark.parametrize("fractions", [(0.5, 0.25, 0.25), (0.8, 0.0, 0.2), (1 / 3, 1 / 3, 1 / 3)])
def test_other_fractions(frames: list[str], fractions: tuple[float, float, float]):
    split = stratified_split(frames, fractions, seed=3)
    names = [n for v in split.values() for n in v]
    assert len(names) == len(set(names)) == 1050
    for fraction, part in zip(fractions, split.values(), strict=True):
        types = [hair_type(n) for n in part]
        for kind in HAIR_TYPES:
            assert abs(types.count(kind) - fraction * 150) <= 1, (kind, fraction)


def test_seed(frames: list[str]):
    assert stratified_split(frames, seed=5) == stratified_split(list(reversed(frames)), seed=5)
    assert stratified_split(frames, seed=5) != stratified_split(frames, seed=6)


def test_each_hair_type_is_shuffled_on_its_own():
    """Not one permutation for all seven types: their test frames sit at other places."""
    test = stratified_split(SYNTHETIC_FRAMES)["test"]
    places = {kind: {int(n[5:]) % 150 for n in test if hair_type(n) == kind} for kind in HAIR_TYPES}
    assert len({frozenset(p) for p in places.values()}) == len(HAIR_TYPES)


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.2, 0.1), (0.7, 0.2, 0.105), (1.2, -0.1, -0.1), (0.5, 0.5)]
)
def test_bad_fractions(fractions: tuple[float, ...]):
    with pytest.raises(ValueError, match="[Ff]ractions"):
        stratified_split(SYNTHETIC_FRAMES, fractions)


def test_duplicates():
    with pytest.raises(ValueError, match="unique"):
        stratified_split(["Frame00001", "Frame00001-org.jpg"])


def test_a_split_too_small_to_cut_every_type_is_refused():
    few = SYNTHETIC_FRAMES[::70]  # 15 frames, two or three of each hair type
    with pytest.raises(ValueError, match="^The test split would be empty: 15 frames are too few"):
        stratified_split(few)
    assert not stratified_split(few, (0.8, 0.2, 0.0))["test"]  # asked for no test split


def test_split_to_json():
    split = {"train": ["Frame00002"], "val": ["Frame00151-org.jpg"], "test": []}
    assert split_to_json(split) == {
        "train": [{"annotation": "Frame00002.npy", "image": "Frame00002-org.jpg"}],
        "val": [{"annotation": "Frame00151.npy", "image": "Frame00151-org.jpg"}],
        "test": [],
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir of empty files named like Figaro1k's images and their PBM masks."""
    root = tmp_path_factory.mktemp("figaro")
    return touch_frames(root, SYNTHETIC_FRAMES, SYNTHETIC_FRAMES)


def touch_frames(root: Path, images: list[str], masked: list[str]) -> Path:
    """Empty files under ``root`` named like the ``images`` and the PBM masks of ``masked``."""
    for folder in ("images", "labels"):
        (root / "GT" / folder).mkdir(parents=True)
    for name in images:
        (root / "GT" / "images" / name).touch()
    for name in masked:
        (root / "GT" / "labels" / name.replace("-org.jpg", "-gt.pbm")).touch()
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "hairseg_jax.data.split", *args, timeout=60)


def test_cli_writes_split(data_dir: Path, tmp_path: Path):
    out = tmp_path / "split.json"
    result = _cli(f"--data_dir={data_dir}", f"--out={out}", "--seed=1")
    assert result.returncode == 0, result.stderr
    assert "735" in result.stdout and "dreadlocks" in result.stdout
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
    written = json.loads(out.read_text())
    expected = stratified_split(SYNTHETIC_FRAMES, seed=1)
    assert written == split_to_json(expected)
    assert {k: [bare_frame(e["image"]) for e in v] for k, v in written.items()} == expected
    assert all(
        bare_frame(e["annotation"]) == bare_frame(e["image"]) for v in written.values() for e in v
    )

    before = out.read_text()
    refused = _cli(f"--data_dir={data_dir}", f"--out={out}", "--seed=2")
    assert refused.returncode != 0
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert out.read_text() == before

    replaced = _cli(f"--data_dir={data_dir}", f"--out={out}", "--seed=2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(out.read_text()) == split_to_json(stratified_split(SYNTHETIC_FRAMES, seed=2))


def test_cli_expands_a_leading_tilde_as_main_does(data_dir: Path, tmp_path: Path):
    """A shell leaves ``--data_dir=~/x`` as it is; main.py's data.data_dir expands it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "Figaro1k").symlink_to(data_dir)
    result = run_python(
        "-m",
        "hairseg_jax.data.split",
        "--data_dir=~/Figaro1k",
        "--out=~/split.json",
        env={"HOME": str(home)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((home / "split.json").read_text()) == split_to_json(
        stratified_split(SYNTHETIC_FRAMES)
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--data_dir={tmp}/missing"], "does not exist"),
        (["--data_dir={data}/GT/images/Frame00001-org.jpg"], "Frame00001-org.jpg is not a folder"),
        (["--data_dir={tmp}"], "no *-org.jpg images"),
        (["--data_dir={data}", "--fractions=0.5,0.2,0.1"], "sum to 1"),
        (["--data_dir={data}", "--fractions=1.2,-0.1,-0.1"], "negative"),
        (["--data_dir={data}", "--fractions=nan,0,1"], "must be finite"),
        (["--data_dir=~hairseg-no-such-user/x"], "there is no user 'hairseg-no-such-user'"),
        (["--data_dir="], "error: --data_dir is empty: it must name the Figaro1k folder."),
        (["--data_dir={data}", "--fractions=0.7,x,0.1"], "error: --fractions: 'x' is not a num"),
        (["--data_dir={data}", "--seed=-1"], "--seed=-1: -1 is not a non-negative integer"),
    ],
)
def test_cli_errors(data_dir: Path, tmp_path: Path, args: list[str], error: str):
    out = tmp_path / "split.json"
    args = [a.format(tmp=tmp_path, data=data_dir) for a in args]
    result = _cli(*args, f"--out={out}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_frames_without_a_mask_are_left_out_with_a_warning(tmp_path: Path):
    """They were written into the split, and main.py then stopped at their missing masks."""
    unmasked = SYNTHETIC_FRAMES[::10]
    masked = [name for name in SYNTHETIC_FRAMES if name not in unmasked]
    root = touch_frames(tmp_path / "figaro", SYNTHETIC_FRAMES, masked)
    out = tmp_path / "split.json"
    result = _cli(f"--data_dir={root}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"warning: {len(unmasked)} of {len(SYNTHETIC_FRAMES)} images have no mask and are left "
        f"out (e.g. {unmasked[0]})."
    )
    assert json.loads(out.read_text()) == split_to_json(stratified_split(masked))


def test_a_folder_of_images_without_masks_is_refused(tmp_path: Path):
    root = touch_frames(tmp_path / "figaro", SYNTHETIC_FRAMES, [])
    result = _cli(f"--data_dir={root}", f"--out={tmp_path / 'split.json'}")
    assert result.returncode != 0 and not (tmp_path / "split.json").exists()
    assert result.stderr.strip() == (
        f"error: no image in {root / 'GT' / 'images'} has a mask (GT/labels/*-gt.pbm, "
        "GT/np_labels/*.npy or GT/labels/*.npy)."
    )


def test_an_existing_out_is_refused_before_the_frames_are_split(tmp_path: Path):
    """Three frames are too few to split: the --out problem was reported only after that."""
    three = SYNTHETIC_FRAMES[:3]
    root = touch_frames(tmp_path / "figaro", three, three)
    out = tmp_path / "split.json"
    out.write_text("{}")
    result = _cli(f"--data_dir={root}", f"--out={out}")
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {out} exists; pass --overwrite to replace it."


def test_an_empty_out_is_named_not_taken_for_the_current_folder(data_dir: Path):
    result = _cli(f"--data_dir={data_dir}", "--out=")
    assert result.returncode != 0
    assert result.stderr.strip() == "error: --out is empty: it must name the JSON file to write."


def test_cli_warns_of_an_empty_split_that_main_would_refuse(data_dir: Path, tmp_path: Path):
    out = tmp_path / "split.json"
    result = _cli(f"--data_dir={data_dir}", f"--out={out}", "--fractions=1,0,0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        "warning: the val and test splits are empty; main.py stops where it reads an empty "
        "split (training reads val, eval reads config.eval.split)."
    )
    assert json.loads(out.read_text())["val"] == []


def test_an_out_of_no_known_user_is_one_line(data_dir: Path):
    result = _cli(f"--data_dir={data_dir}", "--out=~hairseg-no-such-user/split.json")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: --out='~hairseg-no-such-user/split.json': there is no user "
        "'hairseg-no-such-user' ('~/' is your home)."
    )


def test_an_out_file_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch):
    """E.g. into the dataset's own folder, read-only for most users."""

    def read_only(path, data):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(files, "write_json", read_only)
    with pytest.raises(SystemExit) as error:
        split._write_json({}, tmp_path / "split.json")
    out = tmp_path / "split.json"
    assert str(error.value) == f"error: cannot write {out}: Read-only file system."
