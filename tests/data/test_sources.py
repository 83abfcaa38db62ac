"""Tests of load_examples: the config's data fields reach the Figaro1k reader, synthetic splits."""

import itertools
import json
import logging

import numpy as np
import pytest
from PIL import Image

from configs import figaro, synthetic
from hairseg_jax.data import figaro1k
from hairseg_jax.data.figaro1k import DataError
from hairseg_jax.data.sources import load_examples, locate_examples
from tests.data.conftest import (
    as_npy,
    entry,
    random_image,
    random_mask,
    write_frame,
    write_split,
)


def figaro_config(data_dir, **data):
    """configs/figaro.py reading ``data_dir``, with ``data`` fields set."""
    config = figaro.get_config()
    config.data.data_dir = str(data_dir)
    config.data.update(data)
    return config


def test_split_file_is_read_relative_to_the_data_dir(folder):
    write_split(folder / "mine.json", ["Frame00002"], split="val")
    examples = load_examples(figaro_config(folder, split_file="mine.json"), "val")
    assert examples.names == ["Frame00002"]
    with pytest.raises(DataError, match="'val'.*empty"):  # the default file's val is empty
        load_examples(figaro_config(folder), "val")


@pytest.mark.parametrize("source", ["auto", "pbm", "npy"])
def test_mask_source_picks_the_mask_files(folder, source):
    """Each frame gets an .npy mask unlike its PBM: the source decides which is read."""
    npy_masks = [random_mask(seed=10 + i) for i in range(2)]
    for i, mask in enumerate(npy_masks):
        write_frame(folder, f"Frame0000{i + 1}", np_labels=as_npy(mask))
    examples = load_examples(figaro_config(folder, mask_source=source), "train")
    expected = npy_masks if source == "npy" else [random_mask(seed=i) for i in range(2)]
    for mask, want in zip(examples.masks, expected, strict=True):
        np.testing.assert_array_equal(mask, want)


def test_skip_unreadable_leaves_out_an_undecodable_image(folder):
    (folder / "GT" / "images" / "Frame00002-org.jpg").write_text("not an image")
    with pytest.raises(DataError, match="1 of 2 examples of split 'train' cannot be used"):
        load_examples(figaro_config(folder), "train")
    examples = load_examples(figaro_config(folder, skip_unreadable=True), "train")
    assert examples.names == ["Frame00001"]


def test_limit_spreads_over_the_split(folder):
    names = [f"Frame0000{i}" for i in range(1, 5)]
    for i, name in enumerate(names[2:], start=2):
        write_frame(folder, name, random_image(seed=i), pbm=random_mask(seed=i))
    write_split(folder / "train_val_test.json", names, split="train")
    config = figaro_config(folder)
    assert load_examples(config, "train").names == names  # 0: all
    examples = load_examples(config, "train", limit=2)
    assert examples.names == ["Frame00001", "Frame00003"]  # every second one
    with Image.open(folder / "GT" / "images" / "Frame00003-org.jpg") as jpeg:
        np.testing.assert_array_equal(examples.images[1], np.asarray(jpeg.convert("RGB")))
    np.testing.assert_array_equal(examples.masks[1], random_mask(seed=2))


def synthetic_config(seed: int = 0):
    config = synthetic.get_config()
    config.seed = seed
    config.data.synthetic_size = 16
    config.data.synthetic_counts = {"train": 3, "val": 2, "test": 1}
    return config


def test_synthetic_splits_hold_their_counts_and_differ():
    config = synthetic_config()
    counts = {split: len(load_examples(config, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 2, "test": 1}
    assert len(load_examples(config, "train", limit=2)) == 2
    assert len(load_examples(config, "train", limit=5)) == 3  # a limit never adds images
    np.testing.assert_array_equal(
        load_examples(config, "val").images[0], load_examples(config, "val").images[0]
    )
    # Each (seed, split) draws its own pictures: no split of one seed repeats another's.
    firsts = {
        (seed, split): load_examples(synthetic_config(seed), split, limit=1).images[0]
        for seed in (0, 1)
        for split in ("train", "val", "test")
    }
    for (a, image_a), (b, image_b) in itertools.combinations(firsts.items(), 2):
        assert not np.array_equal(image_a, image_b), (a, b)


def test_unknown_dataset_is_named(folder):
    with pytest.raises(ValueError, match="Unknown dataset 'celeba'"):
        load_examples(figaro_config(folder, dataset="celeba"), "train")


def test_locate_examples_finds_every_named_split_without_decoding(folder, monkeypatch):
    lists = {"train": [entry("Frame00001")], "val": [entry("Frame00009")], "test": []}
    (folder / "train_val_test.json").write_text(json.dumps(lists))

    def decode(*args):
        raise AssertionError("nothing is decoded")

    monkeypatch.setattr(figaro1k, "read_example", decode)
    locate_examples(figaro_config(folder), {"train": 0})
    with pytest.raises(DataError, match="split 'val'.*Frame00009-org.jpg does not exist"):
        locate_examples(figaro_config(folder), {"train": 0, "val": 0})
    locate_examples(synthetic.get_config(), {"train": 0, "val": 0, "test": 0})  # no files


def test_a_split_files_warnings_are_logged_once_for_a_located_then_loaded_split(folder, caplog):
    lists = json.loads((folder / "train_val_test.json").read_text())
    lists["test"] = lists["train"][:1]  # tests on a training image
    (folder / "train_val_test.json").write_text(json.dumps(lists))
    with caplog.at_level(logging.WARNING):
        locate_examples(figaro_config(folder), {"train": 0})
        load_examples(figaro_config(folder), "train")
    warnings = [r.getMessage() for r in caplog.records if "in 'test' too" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_a_relative_split_file_found_only_in_the_current_folder_is_named(
    folder, tmp_path, monkeypatch
):
    """It said only that the file inside data_dir does not exist."""
    monkeypatch.chdir(tmp_path)
    write_split(tmp_path / "mine.json", ["Frame00001"], split="train")
    with pytest.raises(DataError) as info:
        load_examples(figaro_config(folder, split_file="mine.json"), "train")
    assert str(info.value) == (
        f"Split file {folder / 'mine.json'} does not exist: a relative data.split_file is read "
        f"from data.data_dir; pass {tmp_path / 'mine.json'} for the one in this folder."
    )
