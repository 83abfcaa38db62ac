"""Reads a Figaro1k folder in the original project's layout into NumPy arrays.

Layout (unchanged from the original PyTorch project)::

    GT/images/FrameNNNNN-org.jpg      RGB photos
    GT/labels/FrameNNNNN-gt.pbm       binary masks, hair white (PBM bit 0)
    GT/np_labels/FrameNNNNN.npy       (or GT/labels/*.npy) uint8 (H, W, 3) masks, 0 or 255
    train_val_test.json               {"train": [{"annotation": ..., "image": ...}], "val", "test"}
"""

import collections
import concurrent.futures
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from hairseg_jax.data.examples import Examples

SPLITS = ("train", "val", "test")
MASK_SOURCES = ("auto", "pbm", "npy")
HAIR_TYPES = ("straight", "wavy", "curly", "kinky", "braids", "dreadlocks", "short")
FRAMES_PER_TYPE = 150  # Frame00001-00150 are straight, 00151-00300 wavy, ...
NUM_FRAMES = FRAMES_PER_TYPE * len(HAIR_TYPES)
_FRAME_RE = re.compile(r"Frame(\d{5})(?:-org\.jpg|-gt\.pbm|\.npy)?")


class DataError(ValueError):
    """A dataset folder, split file or example that cannot be used as it is."""


def resolve_split_file(data_dir: str | os.PathLike, split_file: str | os.PathLike) -> Path:
    """Returns ``split_file`` itself if absolute, else relative to ``data_dir``."""
    path = Path(split_file)
    return path if path.is_absolute() else Path(data_dir) / path


ENTRY_KEYS = ("annotation", "image")  # of each entry of a split file's lists


def read_split_entries(
    split_file: str | os.PathLike, split: str, warn: bool = True
) -> list[dict[str, str]]:
    """Returns the ``{"annotation", "image"}`` entries of one split of a split file; with
    ``warn``, logs the images it lists twice or shares with another split."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    path = Path(split_file)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"Split file {path} {what}.")
    try:  # utf-8-sig: a byte order mark, as some Windows editors write, is skipped
        lists = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:  # e.g. another user's file
        raise DataError(f"Cannot read split file {path}: {e.strerror}.") from e
    except UnicodeDecodeError as e:  # e.g. UTF-16, as some Windows tools write
        raise DataError(f"Split file {path} is not UTF-8 text: {e}.") from e
    except ValueError as e:
        raise DataError(f"Split file {path} is not valid JSON: {e}.") from e
    if not isinstance(lists, dict):
        raise DataError(
            f"Split file {path} must hold a JSON object of 'train', 'val' and 'test' lists; "
            f"it holds a {type(lists).__name__}."
        )
    if split not in lists:
        found = ", ".join(map(repr, lists)) or "none"
        raise DataError(f"Split file {path} has no {split!r} list (it has {found}).")
    entries = lists[split]
    bad = [e for e in entries if not _is_entry(e)] if isinstance(entries, list) else [entries]
    if bad:
        raise DataError(
            f'Split file {path}: {split!r} must be a list of {{"annotation": ..., "image": '
            f"...}} file names; it holds {json.dumps(bad[0])[:80]}."
        )
    if not entries:
        raise DataError(f"Split {split!r} of {path} is empty.")
    swapped = [e for e in entries if _pairs_two_frames(e)]
    if swapped:  # the mask of another photo: trained on or scored against wrong labels
        raise DataError(
            f"Split file {path}: {len(swapped)} entr{'y' if len(swapped) == 1 else 'ies'} of "
            f"{split!r} pair an image with another frame's mask, e.g. {json.dumps(swapped[0])}; "
            "an entry's annotation and image must name the same frame."
        )
    if not warn:
        return entries
    names = _image_names(entries)
    repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if repeated:  # each is read, trained on or scored as often as it is listed
        logging.warning(
            "Split file %s lists images of %r more than once (%d, e.g. %s).",
            path,
            split,
            len(repeated),
            repeated[0],
        )
    images = set(names)
    for other in SPLITS:
        shared = images & set(_image_names(lists.get(other))) if other != split else set()
        if shared:  # e.g. a hand-made split: scores on the other split are not held out
            logging.warning(
                "Split file %s lists images of %r in %r too (%d, e.g. %s).",
                path,
                split,
                other,
                len(shared),
                min(shared),
            )
    return entries


def _is_entry(entry: object) -> bool:
    """Whether ``entry`` is a split's ``{"annotation": ..., "image": ...}`` of file names."""
    return isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ENTRY_KEYS)


def _pairs_two_frames(entry: dict[str, str]) -> bool:
    """Whether a split entry's annotation and image name two different Figaro1k frames (other
    names follow no convention that could tell)."""
    try:
        return frame_number(mask_stem(entry["annotation"])) != frame_number(
            frame_name(entry["image"])
        )
    except ValueError:  # not Figaro1k's names
        return False


def _image_names(entries: object) -> list[str]:
    """The image file names of a split's entries, however their folders are written (none for
    anything but a list of entries)."""
    if not isinstance(entries, list):
        return []
    return [Path(e["image"]).name for e in entries if _is_entry(e)]


def frame_name(image_file: str) -> str:
    """``"Frame00001-org.jpg"`` -> ``"Frame00001"``, whatever the image file's suffix
    (``"Frame00001-org.png"``)."""
    return Path(image_file).stem.removesuffix("-org")


def frame_number(frame: str) -> int:
    """The number N of a frame named like "FrameNNNNN", with an optional file suffix."""
    match = _FRAME_RE.fullmatch(frame)
    number = int(match.group(1)) if match else 0
    if not 1 <= number <= NUM_FRAMES:
        raise ValueError(
            f"Not a Figaro1k frame: {frame!r}; expected 'FrameNNNNN' with NNNNN in "
            f"00001..{NUM_FRAMES:05d}, optionally followed by '-org.jpg', '-gt.pbm' or '.npy'."
        )
    return number


def hair_type(frame: str) -> str:
    """The hair type of a frame ("Frame00123", "Frame00123-org.jpg", ...)."""
    return HAIR_TYPES[(frame_number(frame) - 1) // FRAMES_PER_TYPE]


def mask_stem(annotation: str) -> str:
    """The frame stem of a split entry's annotation: ``"Frame00001.npy"`` and
    ``"Frame00001-gt.pbm"`` -> ``"Frame00001"``."""
    return Path(annotation).stem.removesuffix("-gt")


def mask_candidates(data_dir: Path, annotation: str, mask_source: str) -> list[Path]:
    """The mask files that may hold the mask of ``annotation``, in order of preference."""
    stem = mask_stem(annotation)
    pbm = [data_dir / "GT" / "labels" / f"{stem}-gt.pbm"]
    npy = [
        data_dir / "GT" / "np_labels" / f"{stem}.npy",
        data_dir / "GT" / "labels" / f"{stem}.npy",
    ]
    if mask_source == "pbm":
        return pbm
    if mask_source == "npy":
        return npy
    if mask_source == "auto":
        return pbm + npy
    raise DataError(f"Unknown mask source {mask_source!r}; expected one of {MASK_SOURCES}.")


# PIL's modes of one channel wider than 8 bits: integer (16- or 32-bit) and float grey.
INTEGER_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
WIDE_GREY_MODES = (*INTEGER_GREY_MODES, "F")


def to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 RGB (H, W, 3): grey, palette and CMYK images are converted,
    16-bit images keep their top 8 bits, float images in [0, 1] (the usual range of float
    pictures) are scaled to [0, 255] and others clipped to it, an alpha channel is dropped."""
    if image.mode in INTEGER_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.max(initial=0.0) <= 1.0:
            values = values * 255
        image = Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8))
    return np.asarray(image.convert("RGB"))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 RGB (``to_rgb``), its pixels as stored: the frame of
    its mask (no EXIF rotation, alpha dropped)."""
    with Image.open(path) as image:
        return to_rgb(image)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decodes a PBM or original-format ``.npy`` mask to uint8 (H, W) with values 0/1."""
    path = Path(path)
    if path.suffix == ".npy":
        mask = np.load(path)
        if mask.ndim == 3:
            if not (mask == mask[..., :1]).all():
                raise DataError(f"Mask {path} has channels that differ; expected one 0/255 mask.")
            mask = mask[..., 0]
        if mask.ndim != 2 or not np.isin(mask, (0, 1, 255)).all():
            raise DataError(f"Mask {path} is not a binary (H, W[, 3]) array of 0/255.")
        return (mask > 0).astype(np.uint8)
    with Image.open(path) as image:
        if image.mode != "1":
            raise DataError(f"Mask {path} is not a 1-bit image (mode {image.mode}).")
        return np.asarray(image).astype(np.uint8)


def locate(data_dir: Path, entry: dict[str, str], mask_source: str) -> tuple[Path, Path]:
    """The image and mask files of a split entry; DataError if either is missing."""
    image_path = data_dir / "GT" / "images" / entry["image"]
    if not image_path.is_file():
        raise DataError(f"Image {image_path} does not exist.")
    candidates = mask_candidates(data_dir, entry["annotation"], mask_source)
    mask_path = next((p for p in candidates if p.is_file()), None)
    if mask_path is None:
        raise DataError(
            f"No mask for {entry['image']}: looked for {', '.join(map(str, candidates))}."
        )
    return image_path, mask_path


def _decoded(read: Callable[[Path], np.ndarray], path: Path) -> np.ndarray:
    """``read(path)``; DataError naming ``path`` for whatever the decoder raises."""
    try:
        return read(path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (PIL and np.load raise many kinds on broken files)
        why = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise DataError(f"Cannot decode {path}: {why}") from e


def read_example(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decodes an image and its mask and checks that they fit together."""
    image, mask = _decoded(read_image, image_path), _decoded(read_mask, mask_path)
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}."
        )
    return image, mask


def spread(entries: list, limit: int | None) -> list:
    """``limit`` entries spread evenly over ``entries`` (all for 0, ``None`` or too many).

    Figaro1k's split files list frames in order, and its hair types are ranges of frames, so a
    prefix would hold one type only; every (len/limit)-th entry holds them all.
    """
    if not limit or limit >= len(entries):
        return entries
    return [entries[i * len(entries) // limit] for i in range(limit)]


def _first_errors(errors: list[str], total: int, what: str) -> str:
    """One line summing up ``errors`` (the first three in full)."""
    shown = " | ".join(errors[:3]) + (f" | ... {len(errors) - 3} more" if len(errors) > 3 else "")
    return f"{len(errors)} of {total} {what}: {shown}"


def locate_split(
    data_dir: str | os.PathLike,
    split: str,
    split_file: str | os.PathLike = "train_val_test.json",
    mask_source: str = "auto",
    limit: int | None = None,
    warn: bool = True,
) -> tuple[list[dict[str, str]], list[tuple[Path, Path]]]:
    """The entries of ``limit`` examples (all for 0 or ``None``) spread over a split, and their
    image and mask files; a DataError reports every missing file together. ``warn``: as
    ``read_split_entries``'s."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise DataError(
            f"Data directory {data_dir} {what}; point config.data.data_dir at a "
            "Figaro1k folder (see data/README.md)."
        )
    split_path = resolve_split_file(data_dir, split_file)
    if not split_path.exists() and Path(split_file).is_file():  # from this folder, not data_dir
        raise DataError(
            f"Split file {split_path} does not exist: a relative data.split_file is read from "
            f"data.data_dir; pass {Path(split_file).absolute()} for the one in this folder."
        )
    entries = spread(read_split_entries(split_path, split, warn), limit)
    paths, missing = [], []
    for entry in entries:
        try:
            paths.append(locate(data_dir, entry, mask_source))
        except (DataError, KeyError, TypeError) as e:
            missing.append(str(e) if isinstance(e, DataError) else f"bad entry {entry!r}")
    if missing:
        what = f"examples of split {split!r} in {split_path} are missing files"
        raise DataError(_first_errors(missing, len(entries), what))
    return entries, paths


def read_split(
    data_dir: str | os.PathLike,
    split: str,
    split_file: str | os.PathLike = "train_val_test.json",
    mask_source: str = "auto",
    limit: int | None = None,
    num_threads: int = 8,
    skip_unreadable: bool = False,
) -> Examples:
    """Decodes ``limit`` examples (all for 0 or ``None``) spread over a split into memory.

    Missing files are reported together before anything is decoded (``locate_split``). Files
    that cannot be decoded or do not fit their image fail the read, or are logged and left out
    with ``skip_unreadable``.
    """
    entries, paths = locate_split(data_dir, split, split_file, mask_source, limit)
    split_path = resolve_split_file(data_dir, split_file)
    logging.info("Reading %d %s examples from %s.", len(entries), split, data_dir)

    def read(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray] | str:
        try:
            return read_example(*pair)
        except DataError as e:
            return str(e)

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        results = list(pool.map(read, paths))
    errors = [r for r in results if isinstance(r, str)]
    if errors and not skip_unreadable:
        what = f"examples of split {split!r} cannot be used (skip them: data.skip_unreadable)"
        raise DataError(_first_errors(errors, len(entries), what))
    for error in errors:
        logging.warning("Skipping an example: %s", error)
    kept = [(e, r) for e, r in zip(entries, results, strict=True) if not isinstance(r, str)]
    if not kept:
        raise DataError(f"No usable example in split {split!r} of {split_path}.")
    return Examples(
        names=[frame_name(e["image"]) for e, _ in kept],
        images=[image for _, (image, _) in kept],
        masks=[mask for _, (_, mask) in kept],
        skipped=tuple(
            frame_name(e["image"])
            for e, r in zip(entries, results, strict=True)
            if isinstance(r, str)
        ),
    )
