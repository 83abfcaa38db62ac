"""Stratified train/val/test split of Figaro1k by hair type.

Usage:
    python -m hairseg_jax.data.split --data_dir=DIR --out=FILE [--seed=0] \
        [--fractions=0.7,0.2,0.1] [--overwrite]

Lists the frames of ``DIR/GT/images/*-org.jpg`` that have a mask (frames without one are
left out, with a warning), splits them so that every hair type is cut by the same fractions,
and writes the split as JSON in the original project's format.
"""

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from hairseg_jax import cli, files
from hairseg_jax.data.figaro1k import (
    HAIR_TYPES,
    SPLITS,
    frame_name,
    frame_number,
    hair_type,
    mask_candidates,
)


def bare_frame(frame: str) -> str:
    """The bare frame name, e.g. "Frame00123" for "Frame00123-org.jpg" (ValueError if not a
    Figaro1k frame)."""
    return f"Frame{frame_number(frame):05d}"


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Returns the fractions as a triple, or raises ValueError if they are not a distribution."""
    if len(fractions) != len(SPLITS):
        raise ValueError(f"Need {len(SPLITS)} fractions (train, val, test); got {fractions}.")
    if not all(math.isfinite(f) for f in fractions):
        raise ValueError(f"Fractions must be finite; got {fractions}.")
    if not all(f >= 0 for f in fractions):
        raise ValueError(f"Fractions must not be negative; got {fractions}.")
    if not abs(sum(fractions) - 1) <= 1e-6:
        raise ValueError(f"Fractions must sum to 1; got {fractions} (sum {sum(fractions):g}).")
    return tuple(float(f) for f in fractions)


def stratified_split(
    frames: Sequence[str], fractions: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0
) -> dict[str, list[str]]:
    """Splits frames into "train", "val" and "test", cutting each hair type by `fractions`.

    Each type's frames are sorted, shuffled with ``np.random.default_rng(seed)`` and cut at the
    rounded cumulative fractions, so every frame lands in exactly one split and each split holds
    within one frame of its fraction of every type. Returns bare frame names, sorted.

    Raises:
      ValueError: bad fractions, repeated frames, or a split with a positive fraction that
        gets no frame (too few frames of each type).
    """
    fractions = _check_fractions(fractions)
    names = sorted({bare_frame(f) for f in frames})
    if len(names) != len(frames):
        raise ValueError(f"Frames must be unique; got {len(frames) - len(names)} duplicates.")
    rng = np.random.default_rng(seed)
    split = {name: [] for name in SPLITS}
    for kind in HAIR_TYPES:
        group = [n for n in names if hair_type(n) == kind]
        shuffled = [group[i] for i in rng.permutation(len(group))]
        bounds = [0, *(int(round(c * len(group))) for c in np.cumsum(fractions)[:-1]), len(group)]
        for name, start, stop in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            split[name].extend(shuffled[start:stop])
    empty = [name for name, f in zip(SPLITS, fractions, strict=True) if f > 0 and not split[name]]
    if empty:
        raise ValueError(
            f"The {' and '.join(empty)} split would be empty: {len(names)} frames are too few "
            f"to cut each hair type by {fractions}."
        )
    return {name: sorted(split[name]) for name in SPLITS}


def split_to_json(split: dict[str, Sequence[str]]) -> dict[str, list[dict[str, str]]]:
    """Returns the split in the original project's train_val_test.json format."""
    return {
        name: [
            {"annotation": f"{bare_frame(f)}.npy", "image": f"{bare_frame(f)}-org.jpg"}
            for f in frames
        ]
        for name, frames in split.items()
    }


def _check_out(out: Path, overwrite: bool) -> None:
    """Exits with a one-line error if ``out`` cannot be the split file written."""
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a directory.")
    if out.exists() and not overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it.")
    if not out.parent.is_dir():
        raise SystemExit(f"error: output directory {out.parent} does not exist.")


def _masked_images(data_dir: Path) -> list[str]:
    """The names of ``data_dir``'s ``GT/images/*-org.jpg`` that have a mask, sorted; exits with
    a one-line error if none has, and warns of those left out."""
    images = sorted(p.name for p in (data_dir / "GT" / "images").glob("*-org.jpg"))
    if not images:
        raise SystemExit(f"error: no *-org.jpg images found in {data_dir / 'GT' / 'images'}.")
    masked = [
        name
        for name in images
        if any(p.is_file() for p in mask_candidates(data_dir, frame_name(name), "auto"))
    ]
    if not masked:
        raise SystemExit(
            f"error: no image in {data_dir / 'GT' / 'images'} has a mask (GT/labels/*-gt.pbm, "
            "GT/np_labels/*.npy or GT/labels/*.npy)."
        )
    if len(masked) < len(images):
        unmasked = sorted(set(images) - set(masked))
        print(
            f"warning: {len(unmasked)} of {len(images)} images have no mask and are left out "
            f"(e.g. {unmasked[0]}).",
            file=sys.stderr,
        )
    return masked


def _write_json(data: dict, out: Path) -> None:
    """Writes ``data`` to ``out`` atomically."""
    try:
        files.write_json(out, data)
    except OSError as e:  # e.g. into the dataset's read-only folder
        raise SystemExit(f"error: cannot write {out}: {e.strerror}.") from None


def _print_counts(split: dict[str, list[str]]) -> None:
    """Prints a table of frame counts per split and hair type."""
    print(f"{'split':<6}{'total':>7}" + "".join(f"{kind:>12}" for kind in HAIR_TYPES))
    for name, frames in split.items():
        types = [hair_type(f) for f in frames]
        print(f"{name:<6}{len(frames):>7}" + "".join(f"{types.count(k):>12}" for k in HAIR_TYPES))


def main(argv: Sequence[str]) -> None:
    """Splits the frames of --data_dir and writes the JSON to --out."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    flag = flags.FLAGS
    for name, what in (("data_dir", "the Figaro1k folder"), ("out", "the JSON file to write")):
        if not flag[name].value.strip():  # e.g. an unset shell variable
            raise SystemExit(f"error: --{name} is empty: it must name {what}.")
    try:
        data_dir = Path(cli.home_expanded(flag.data_dir, "--data_dir"))
        out = Path(cli.home_expanded(flag.out, "--out"))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise SystemExit(f"error: data directory {data_dir} {what}.")
    _check_out(out, flag.overwrite)
    images = _masked_images(data_dir)
    try:
        fractions = [_number(f, "--fractions") for f in flag.fractions]
        split = stratified_split(images, fractions, flag.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    _write_json(split_to_json(split), out)
    _print_counts(split)
    print(f"wrote {out}")
    if empty := [name for name in SPLITS if not split[name]]:
        print(
            f"warning: the {' and '.join(empty)} split{' is' if len(empty) == 1 else 's are'} "
            "empty; main.py stops where it reads an empty split (training reads val, eval "
            "reads config.eval.split).",
            file=sys.stderr,
        )


def _number(value: str, name: str) -> float:
    """``value`` of the flag ``name`` as a float; ValueError naming the flag otherwise."""
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number.") from None


def _define_flags() -> None:
    """Defines the CLI flags (only when run as a script, so importing defines none)."""
    flags.DEFINE_string("data_dir", None, "Figaro1k root, holding GT/images/*-org.jpg.")
    flags.DEFINE_string("out", None, "Where to write the split JSON.")
    flags.DEFINE_integer("seed", 0, "Seed of the shuffle within each hair type.", lower_bound=0)
    flags.DEFINE_list("fractions", ["0.7", "0.2", "0.1"], "Train, val and test fractions.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.mark_flags_as_required(["data_dir", "out"])


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
