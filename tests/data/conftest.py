"""Tiny generated Figaro1k folders for the data tests."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def entry(name: str) -> dict[str, str]:
    """The split-file entry of a frame, as in the original train_val_test.json."""
    return {"annotation": f"{name}.npy", "image": f"{name}-org.jpg"}


def write_split(path: Path, names: list[str], split: str = "test") -> Path:
    """Writes a split file that lists ``names`` under ``split``; returns its path."""
    splits = {s: [] for s in ("train", "val", "test")}
    splits[split] = [entry(n) for n in names]
    path.write_text(json.dumps(splits))
    return path


def random_image(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def checkerboard(side: int) -> np.ndarray:
    """A uint8 (side, side, 3) board of 1-pixel black and white squares: aliases when shrunk
    by point sampling, an even grey when shrunk antialiased."""
    y, x = np.mgrid[:side, :side]
    return np.where(((y + x) % 2 == 0)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)


def random_mask(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width)) < 0.4).astype(np.uint8)


def write_frame(
    root: Path,
    name: str,
    image: np.ndarray | None = None,
    pbm: np.ndarray | None = None,
    np_labels: np.ndarray | None = None,
    labels_npy: np.ndarray | None = None,
) -> None:
    """Writes a frame's JPEG and whichever of its PBM / .npy masks are given."""
    for sub in ("images", "labels", "np_labels"):
        (root / "GT" / sub).mkdir(parents=True, exist_ok=True)
    if image is not None:
        Image.fromarray(image).save(root / "GT" / "images" / f"{name}-org.jpg")
    if pbm is not None:
        Image.fromarray(pbm.astype(bool)).save(root / "GT" / "labels" / f"{name}-gt.pbm")
    if np_labels is not None:
        np.save(root / "GT" / "np_labels" / f"{name}.npy", np_labels)
    if labels_npy is not None:
        np.save(root / "GT" / "labels" / f"{name}.npy", labels_npy)


def as_npy(mask: np.ndarray) -> np.ndarray:
    """A 0/1 mask in the original .npy format: uint8 (H, W, 3) of 0/255."""
    return np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A two-frame folder with JPEGs, PBM masks and a split file naming both under train."""
    root = tmp_path / "Figaro1k"
    for i, name in enumerate(["Frame00001", "Frame00002"]):
        write_frame(root, name, random_image(seed=i), pbm=random_mask(seed=i))
    write_split(root / "train_val_test.json", ["Frame00001", "Frame00002"], split="train")
    return root


def assert_crops_and_rotations_span_their_ranges(
    maps: list[np.ndarray], side: int, size: int, scale: tuple, ratio: tuple, rotation: float
) -> None:
    """Checks the draws of ``sample_affine`` (no flips, a ``side``^2 image, crops that fit):
    angles within +-``rotation`` degrees, both ways; crop areas and aspects across
    ``scale`` and ``ratio``, aspect drawn apart from area."""
    angles, areas, aspects = [], [], []
    for m in maps:
        across, down = m[:2, 0] * size, m[:2, 1] * size  # the crop's sides in the input
        angles.append(np.degrees(np.arctan2(across[1], across[0])))
        width, height = np.hypot(*across), np.hypot(*down)
        areas.append(width * height / side**2)
        aspects.append(width / height)
    assert max(np.abs(angles)) <= rotation + 1e-3, angles
    assert min(angles) < -rotation / 2 and max(angles) > rotation / 2, angles
    assert scale[0] - 1e-4 <= min(areas) and max(areas) <= scale[1] + 1e-4, areas
    assert ratio[0] - 1e-4 <= min(aspects) and max(aspects) <= ratio[1] + 1e-4, aspects
    low, high = np.log(ratio)
    assert min(np.log(aspects)) < low + (high - low) / 4, aspects
    assert max(np.log(aspects)) > high - (high - low) / 4, aspects
    assert abs(np.corrcoef(np.log(aspects), areas)[0, 1]) < 0.8
