"""Tests of the Figaro1k folder reader on the real data and on tiny generated folders."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hairseg_jax.data.figaro1k import (
    HAIR_TYPES,
    DataError,
    frame_name,
    hair_type,
    locate,
    read_example,
    read_image,
    read_split,
    spread,
)
from tests.data.conftest import as_npy, entry, random_image, random_mask, write_frame, write_split

# The frames of the real Figaro1k that also have an original-format .npy mask.
NPY_FRAMES = [f"Frame{i:05d}" for i in range(1, 1051, 50)]


def read_entry(root: Path, item: dict[str, str], mask_source: str):
    """Locates and decodes one split entry."""
    return read_example(*locate(root, item, mask_source))


# Frame names.


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ("Frame00001", "straight"),
        ("Frame00150", "straight"),
        ("Frame00151", "wavy"),
        ("Frame00300-org.jpg", "wavy"),
        ("Frame00301.npy", "curly"),
        ("Frame00600", "kinky"),
        ("Frame00601-gt.pbm", "braids"),
        ("Frame00751", "dreadlocks"),
        ("Frame00901", "short"),
        ("Frame01050", "short"),
    ],
)
def test_hair_type(frame: str, kind: str):
    assert hair_type(frame) == kind


@pytest.mark.parametrize(
    "frame",
    ["Frame00000", "Frame01051", "Frame123", "frame00001", "Frame00001.png", "", "x/Frame00001"],
)
def test_hair_type_rejects(frame: str):
    with pytest.raises(ValueError, match="Not a Figaro1k frame"):
        hair_type(frame)


@pytest.mark.parametrize(
    "image", ["Frame00751-org.jpg", "Frame00751-org.png", "Frame00751-org", "x/Frame00751-org.jpg"]
)
def test_frame_name_drops_any_image_suffix(image: str):
    """A PNG's name kept its suffix, and so lost its hair type in the evaluation report."""
    assert frame_name(image) == "Frame00751" and hair_type(frame_name(image)) == "dreadlocks"


# Real data.


def test_pbm_and_npy_masks_agree_on_real_frames(figaro_dir, tmp_path):
    """Every frame with an .npy mask reads the same 0/1 mask from its PBM."""
    missing = [
        n for n in NPY_FRAMES if not (figaro_dir / "GT" / "np_labels" / f"{n}.npy").is_file()
    ]
    assert not missing, f"expected .npy masks in GT/np_labels for {missing}"
    split_file = write_split(tmp_path / "split.json", NPY_FRAMES)
    pbm = read_split(figaro_dir, "test", split_file, mask_source="pbm", num_threads=2)
    npy = read_split(figaro_dir, "test", split_file, mask_source="npy", num_threads=2)
    assert pbm.names == npy.names == NPY_FRAMES
    for name, image, a, b in zip(pbm.names, pbm.images, pbm.masks, npy.masks, strict=True):
        assert a.dtype == b.dtype == np.uint8, name
        assert a.shape == b.shape == image.shape[:2], name
        assert set(np.unique(a)) <= {0, 1}, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_read_split_limit_on_real_data(figaro_dir):
    """``limit`` reads examples spread over the real split file as RGB images and masks."""
    examples = read_split(figaro_dir, "train", limit=16, num_threads=2)
    assert len(examples) == 16
    entries = json.loads((figaro_dir / "train_val_test.json").read_text())["train"]
    expected = [entries[i * len(entries) // 16]["image"] for i in range(16)]
    assert examples.names == [name.removesuffix("-org.jpg") for name in expected]
    assert examples.names[0] == "Frame00001"
    assert set(map(hair_type, examples.names)) == set(HAIR_TYPES)  # a prefix: straight hair only
    for name, image, mask in zip(examples.names, examples.images, examples.masks, strict=True):
        assert name.startswith("Frame") and len(name) == len("Frame00001")
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 1}
        assert 0.02 < mask.mean() < 0.98, f"{name} mask is nearly all one value"


@pytest.mark.parametrize("limit", [None, 0, 1, 3, 7, 10, 11])
def test_spread_picks_evenly_spaced_entries_in_order(limit):
    entries = list(range(10))
    picked = spread(entries, limit)
    if limit in (None, 0, 10, 11):
        assert picked == entries
    else:
        assert len(picked) == len(set(picked)) == limit and picked == sorted(picked)
        assert picked[0] == 0 and max(np.diff([*picked, 10])) - min(np.diff([*picked, 10])) <= 1


# Generated folders.


def test_generated_folder_reads(folder):
    """The generated folder reads back its masks exactly and its images as PIL decodes the
    JPEGs written from them."""
    examples = read_split(folder, "train", num_threads=1)
    assert examples.names == ["Frame00001", "Frame00002"]
    for i, (image, mask) in enumerate(zip(examples.images, examples.masks, strict=True)):
        assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
        with Image.open(folder / "GT" / "images" / f"Frame0000{i + 1}-org.jpg") as jpeg:
            np.testing.assert_array_equal(image, np.asarray(jpeg.convert("RGB")))
        np.testing.assert_array_equal(mask, random_mask(seed=i))


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing} does not exist"):
        read_split(missing, "train")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=f"{tmp_path / 'a_file'} is not a folder"):
        read_split(tmp_path / "a_file", "train")


def test_missing_split_file(folder):
    with pytest.raises(DataError, match="does not exist"):
        read_split(folder, "train", split_file="other.json")
    (folder / "splits").mkdir()
    with pytest.raises(DataError, match="splits is a folder, not a file"):
        read_split(folder, "train", split_file="splits")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"val": [], "test": []}',
        '{"train": null}',
        '{"train": 5}',
        '{"train": ["Frame00001-org.jpg"]}',
        '{"train": [{"image": "Frame00001-org.jpg"}]}',
        '{"train": [{"image": 1, "annotation": "Frame00001.npy"}]}',
    ],
    ids=str,
)
def test_malformed_split_file(folder, text):
    (folder / "bad.json").write_text(text)
    with pytest.raises(DataError, match="bad.json") as info:
        read_split(folder, "train", split_file=folder / "bad.json")
    if text.startswith('{"train": '):  # a 'train' of anything but entries
        assert "bad.json: 'train' must be a list of {\"annotation\": " in str(info.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "{not json",
            "is not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1).",
        ),
        ("[1, 2]", "must hold a JSON object of 'train', 'val' and 'test' lists; it holds a list."),
        ('{"val": [], "test": []}', "has no 'train' list (it has 'val', 'test')."),
        ("{}", "has no 'train' list (it has none)."),
    ],
    ids=str,
)
def test_a_malformed_split_file_is_named_in_words(folder, text, error):
    """They read "has no readable 'train' list: list indices must be integers or slices, not
    str", or ended in the missing key's repr."""
    (folder / "bad.json").write_text(text)
    with pytest.raises(DataError) as info:
        read_split(folder, "train", split_file=folder / "bad.json")
    assert str(info.value) == f"Split file {folder / 'bad.json'} {error}"


def test_an_entry_pairing_an_image_with_another_frames_mask_is_refused(folder):
    """Both frames being the same size, the other frame's mask was used without a word."""
    swapped = [
        {"annotation": "Frame00002.npy", "image": "Frame00001-org.jpg"},
        {"annotation": "Frame00001-gt.pbm", "image": "Frame00002-org.jpg"},
    ]
    (folder / "swapped.json").write_text(json.dumps({"train": swapped, "val": [], "test": []}))
    with pytest.raises(DataError) as info:
        read_split(folder, "train", split_file="swapped.json")
    assert str(info.value) == (
        f"Split file {folder / 'swapped.json'}: 2 entries of 'train' pair an image with another "
        f"frame's mask, e.g. {json.dumps(swapped[0])}; an entry's annotation and image must "
        "name the same frame."
    )


def test_a_split_file_that_cannot_be_read_is_a_data_error(folder, monkeypatch):
    """E.g. another user's file: not a bare PermissionError (as root, chmod cannot show it)."""

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", denied)
    split_file = folder / "train_val_test.json"
    with pytest.raises(DataError, match=f"^Cannot read split file {split_file}: Permission denied"):
        read_split(folder, "train")


def test_split_file_in_utf16_is_named_and_a_byte_order_mark_is_read(folder):
    """As Windows tools may write them: UTF-16 is refused in one line, UTF-8's mark skipped."""
    text = (folder / "train_val_test.json").read_text()
    (folder / "utf16.json").write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match="utf16.json is not UTF-8 text: 'utf-8' codec can't"):
        read_split(folder, "train", split_file="utf16.json")
    (folder / "bom.json").write_text(text, encoding="utf-8-sig")
    assert read_split(folder, "train", split_file="bom.json").names == ["Frame00001", "Frame00002"]


def test_images_listed_in_two_splits_or_twice_are_warned_about(folder, caplog):
    lists = json.loads((folder / "train_val_test.json").read_text())
    lists["test"] = lists["train"][1:]  # a hand-made split that tests on a training image
    (folder / "leaky.json").write_text(json.dumps(lists))
    with caplog.at_level(logging.WARNING):
        read_split(folder, "train", split_file="leaky.json")
    assert caplog.messages == [
        f"Split file {folder / 'leaky.json'} lists images of 'train' in 'test' too (1, e.g. "
        "Frame00002-org.jpg)."
    ]
    caplog.clear()
    read_split(folder, "train")  # the folder's own split: disjoint, no warning
    assert not caplog.messages
    # The same image written with its folder, or listed twice in one split.
    lists["test"] = [
        {**lists["train"][0], "image": str(folder / "GT" / "images" / "Frame00001-org.jpg")}
    ]
    lists["train"] = [*lists["train"], lists["train"][1]]
    (folder / "leaky.json").write_text(json.dumps(lists))
    with caplog.at_level(logging.WARNING):
        examples = read_split(folder, "train", split_file="leaky.json")
    assert examples.names == ["Frame00001", "Frame00002", "Frame00002"]  # as listed
    assert caplog.messages == [
        f"Split file {folder / 'leaky.json'} lists images of 'train' more than once (1, e.g. "
        "Frame00002-org.jpg).",
        f"Split file {folder / 'leaky.json'} lists images of 'train' in 'test' too (1, e.g. "
        "Frame00001-org.jpg).",
    ]


def test_empty_split(folder):
    with pytest.raises(DataError, match="'val'.*empty"):
        read_split(folder, "val")


def test_unknown_split(folder):
    with pytest.raises(DataError, match="Unknown split"):
        read_split(folder, "validation")


def test_absolute_split_file_outside_data_dir(folder, tmp_path):
    split_file = write_split(tmp_path / "elsewhere.json", ["Frame00002"], split="val")
    examples = read_split(folder, "val", split_file=split_file)
    assert examples.names == ["Frame00002"]


def test_missing_image(folder):
    (folder / "GT" / "images" / "Frame00002-org.jpg").unlink()
    with pytest.raises(DataError, match="Frame00002-org.jpg"):
        read_split(folder, "train")


def test_image_without_mask_names_looked_for_files(folder):
    (folder / "GT" / "labels" / "Frame00002-gt.pbm").unlink()
    with pytest.raises(DataError, match="No mask for Frame00002-org.jpg") as error:
        read_split(folder, "train")
    message = str(error.value)
    for path in [
        folder / "GT" / "labels" / "Frame00002-gt.pbm",
        folder / "GT" / "np_labels" / "Frame00002.npy",
        folder / "GT" / "labels" / "Frame00002.npy",
    ]:
        assert str(path) in message


def test_npy_source_ignores_pbm(folder):
    with pytest.raises(DataError, match="Frame00001.npy"):
        read_entry(folder, entry("Frame00001"), "npy")


def test_unknown_mask_source(folder):
    with pytest.raises(DataError, match="Unknown mask source"):
        read_entry(folder, entry("Frame00001"), "png")


def test_mask_size_differs_from_image(folder):
    write_frame(folder, "Frame00002", pbm=random_mask(12, 15))
    with pytest.raises(DataError, match=r"15x12 but its image is 16x12"):
        read_split(folder, "train")


@pytest.mark.parametrize("value", [2, 128, 254])
def test_npy_mask_with_other_values(folder, value):
    mask = as_npy(random_mask())
    mask[0, 0] = value
    write_frame(folder, "Frame00003", random_image(), np_labels=mask)
    with pytest.raises(DataError, match="Frame00003.npy"):
        read_entry(folder, entry("Frame00003"), "npy")


def test_npy_mask_whose_channels_differ(folder):
    mask = as_npy(random_mask())
    mask[0, 0, 1] = 255 - mask[0, 0, 0]  # channel 0 alone would pass
    write_frame(folder, "Frame00003", random_image(), np_labels=mask)
    with pytest.raises(DataError, match="Frame00003.npy has channels that differ"):
        read_entry(folder, entry("Frame00003"), "npy")


def test_npy_mask_of_wrong_rank(folder):
    write_frame(folder, "Frame00003", random_image(), np_labels=np.zeros((12, 16, 3, 1), np.uint8))
    with pytest.raises(DataError, match="Frame00003.npy"):
        read_entry(folder, entry("Frame00003"), "npy")


def test_pbm_that_is_not_one_bit(folder):
    path = folder / "GT" / "labels" / "Frame00001-gt.pbm"
    Image.fromarray(random_mask() * 255).save(path, format="PPM")  # a greyscale P5 file
    with pytest.raises(DataError, match="1-bit"):
        read_entry(folder, entry("Frame00001"), "pbm")


@pytest.mark.parametrize("layout", ["HW3", "HW", "HW01"])
def test_npy_mask_layouts(folder, layout):
    """The original (H, W, 3) 0/255 layout and a plain (H, W) one, of 0/255 or 0/1, all read
    as 0/1."""
    mask = random_mask(seed=5)
    npy = {"HW3": as_npy(mask), "HW": mask * 255, "HW01": mask}[layout]
    write_frame(folder, "Frame00003", random_image(), np_labels=npy)
    _, read = read_entry(folder, entry("Frame00003"), "npy")
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, mask)


def test_a_transposed_mask_is_refused(folder):
    """As many pixels as its image, but 12 wide and 16 high: it would lie across the hair."""
    write_frame(folder, "Frame00002", random_image(), pbm=random_mask(16, 12))
    with pytest.raises(DataError, match="is 12x16 but its image is 16x12"):
        read_entry(folder, entry("Frame00002"), "pbm")


def test_a_folder_named_like_a_mask_is_not_taken_for_one(folder):
    """``auto`` goes on to the next candidate file, as it does where the PBM is missing."""
    pbm = folder / "GT" / "labels" / "Frame00001-gt.pbm"
    pbm.unlink()
    pbm.mkdir()
    mask = random_mask(seed=7)
    write_frame(folder, "Frame00001", np_labels=as_npy(mask))
    _, read = read_entry(folder, entry("Frame00001"), "auto")
    np.testing.assert_array_equal(read, mask)


def test_auto_mask_source_prefers_pbm_then_np_labels_then_labels(folder):
    masks = [random_mask(seed=s) for s in (10, 11, 12)]
    write_frame(
        folder,
        "Frame00003",
        random_image(),
        pbm=masks[0],
        np_labels=as_npy(masks[1]),
        labels_npy=as_npy(masks[2]),
    )
    labels = folder / "GT" / "labels"
    for expected, remove in [
        (masks[0], labels / "Frame00003-gt.pbm"),
        (masks[1], folder / "GT" / "np_labels" / "Frame00003.npy"),
        (masks[2], labels / "Frame00003.npy"),
    ]:
        _, mask = read_entry(folder, entry("Frame00003"), "auto")
        np.testing.assert_array_equal(mask, expected)
        remove.unlink()
    with pytest.raises(DataError, match="No mask"):
        read_entry(folder, entry("Frame00003"), "auto")


def test_pbm_style_annotation_names(folder):
    """Entries may name the ``-gt.pbm`` file instead of the ``.npy`` one."""
    image, mask = read_entry(
        folder, {"annotation": "Frame00002-gt.pbm", "image": "Frame00002-org.jpg"}, "auto"
    )
    assert image.shape == (12, 16, 3)
    np.testing.assert_array_equal(mask, random_mask(seed=1))


# read_image.


def test_read_rgb_png_exactly(tmp_path):
    image = random_image(7, 9)
    Image.fromarray(image).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), image)


def test_read_grey_jpeg(tmp_path):
    grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (12, 1))
    Image.fromarray(grey).save(tmp_path / "x.jpg")
    image = read_image(tmp_path / "x.jpg")
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert np.abs(image[..., 0].astype(int) - grey).max() <= 8


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_read_float_tiff_in_either_range(tmp_path, scale):
    """A float picture holds [0, 1] (scikit-image, OpenCV) or [0, 255]; both read as uint8."""
    grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (12, 1))
    values = (grey / 255 * scale).astype(np.float32)
    values[0, 0] = np.nan
    Image.fromarray(values, "F").save(tmp_path / "x.tif")
    image = read_image(tmp_path / "x.tif")
    expected = np.where(np.isnan(values), np.uint8(0), grey)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=-1))


def test_read_rgba_png_drops_alpha(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (12, 16, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_read_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(tmp_path / "x.jpg")
    with Image.open(tmp_path / "x.jpg") as saved:
        assert saved.mode == "CMYK"
    image = read_image(tmp_path / "x.jpg")
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    red = np.array([255, 0, 0])
    assert np.abs(image.astype(int) - red).max() <= 8


def test_read_16_bit_png_keeps_high_byte(tmp_path):
    values = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 341 + 7).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as saved:
        assert saved.mode.startswith("I")
    image = read_image(tmp_path / "x.png")
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    np.testing.assert_array_equal(image, np.repeat((values >> 8)[..., None], 3, axis=2))


# Reporting and skipping bad examples.


def test_all_missing_files_are_reported_together(folder):
    write_split(folder / "train_val_test.json", ["Frame00001", "Frame00002", "Frame00007"], "train")
    (folder / "GT" / "images" / "Frame00002-org.jpg").unlink()
    with pytest.raises(DataError, match="2 of 3 examples of split 'train'") as error:
        read_split(folder, "train")
    assert "Frame00002-org.jpg" in str(error.value) and "Frame00007-org.jpg" in str(error.value)


@pytest.mark.parametrize(
    "broken",
    [
        "truncated_jpeg",
        "text_as_jpeg",
        "truncated_pbm",
        "bad_npy",
        "npy_header",  # np.load raised tokenize.TokenError
        "npy_shape",  # a header of a huge shape: MemoryError
        "pbm_size",  # 20000x20000: PIL's DecompressionBombError
    ],
)
def test_corrupt_file_is_named_or_skipped(folder, broken):
    image = folder / "GT" / "images" / "Frame00002-org.jpg"
    pbm = folder / "GT" / "labels" / "Frame00002-gt.pbm"
    source = "auto"
    if broken == "truncated_jpeg":
        image.write_bytes(image.read_bytes()[:60])
        bad = image
    elif broken == "text_as_jpeg":
        image.write_text("not an image")
        bad = image
    elif broken == "truncated_pbm":
        pbm.write_bytes(pbm.read_bytes()[:12])
        bad = pbm
    elif broken == "pbm_size":
        pbm.write_bytes(b"P4\n20000 20000\n" + b"\0" * 64)
        bad = pbm
    else:
        bad = folder / "GT" / "np_labels" / "Frame00002.npy"
        np.save(bad, as_npy(random_mask(seed=1)))
        header = {
            "bad_npy": (b"\x93NUMPY garbage", b""),
            "npy_header": (b"(12, 16, 3), }", b"(12, 16, 3\xe5 }"),
            "npy_shape": (b"3), }" + b" " * 13, b"39999999999999), }"),
        }[broken]
        data = bad.read_bytes()
        bad.write_bytes(data.replace(*header) if header[1] else header[0])
        source = "npy"
        np.save(folder / "GT" / "np_labels" / "Frame00001.npy", as_npy(random_mask(seed=0)))
    with pytest.raises(DataError, match="1 of 2 examples of split 'train' cannot be used") as e:
        read_split(folder, "train", mask_source=source)
    assert f"Cannot decode {bad}: " in str(e.value)  # the broken file alone, not image "or" mask
    examples = read_split(folder, "train", mask_source=source, skip_unreadable=True)
    assert examples.names == ["Frame00001"] and examples.skipped == ("Frame00002",)


def test_the_examples_kept_after_a_skip_keep_their_names(folder):
    """The first of two is broken: the one left is named, and read, as the second."""
    (folder / "GT" / "images" / "Frame00001-org.jpg").write_text("not an image")
    examples = read_split(folder, "train", skip_unreadable=True)
    assert examples.names == ["Frame00002"]
    second = read_entry(folder, entry("Frame00002"), "auto")
    np.testing.assert_array_equal(examples.images[0], second[0])
    np.testing.assert_array_equal(examples.masks[0], second[1])
