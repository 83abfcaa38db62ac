"""Writes a smaller copy of a Figaro1k folder, to carry to a machine that lacks the dataset.

The training split's images are shrunk so their longer side is at most ``--max_side``
(JPEG quality ``--quality``; masks by nearest neighbour, as 1-bit PBM files); the splits of
``--full_splits`` are copied byte for byte, so they are still scored at their original
resolution; other splits are left out of the copy and of its split file. The copy reads like
the original (``--config.data.data_dir=OUT``). ``benchmarks/time_to_dice.py`` trains from
such a copy (with ``config.augment.device_max_side`` no larger than this ``--max_side``).

    python benchmarks/shrink_figaro.py --data_dir=data/Figaro1k --out=/tmp/figaro_small
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hairseg_jax.data import device_augment, figaro1k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/Figaro1k")
    parser.add_argument("--split_file", default="train_val_test.json")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--max_side", type=int, default=512)
    parser.add_argument("--quality", type=int, default=92)
    parser.add_argument("--full_splits", default="test", help="comma-separated")
    args = parser.parse_args()
    if args.max_side < 1:
        parser.error(f"--max_side={args.max_side} must be positive")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality={args.quality} must be in [1, 100]")
    data_dir, out = Path(args.data_dir), Path(args.out)
    if out.exists():
        parser.error(f"--out={out} exists; name a folder to create")
    full = args.full_splits.split(",") if args.full_splits else []
    try:
        split_file = figaro1k.resolve_split_file(data_dir, args.split_file)
        splits = {
            split: figaro1k.read_split_entries(split_file, split) for split in ["train", *full]
        }
        write_copy(data_dir, splits, full, out, args.max_side, args.quality)
    except (figaro1k.DataError, OSError) as e:  # a missing file, or --out cannot be written
        shutil.rmtree(out, ignore_errors=True)  # made here: no partial copy is left
        cause = f"Cannot write --out={out}: {e}" if isinstance(e, OSError) else e
        sys.exit(f"FATAL {cause}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {', '.join(f'{len(v)} {k}' for k, v in splits.items())}; {size / 2**20:.1f} MiB")


def write_copy(
    data_dir: Path,
    splits: dict[str, list[dict]],
    full: list[str],
    out: Path,
    max_side: int,
    quality: int,
) -> None:
    """Writes ``splits``' examples of ``data_dir`` to ``out``: ``full``'s as they are, the
    others' shrunk to ``max_side`` (JPEG ``quality``), and their split file."""
    (out / "GT" / "images").mkdir(parents=True)
    (out / "GT" / "labels").mkdir(parents=True)
    for split, entries in splits.items():
        for entry in entries:
            image_path, mask_path = figaro1k.locate(data_dir, entry, "auto")
            image_out = out / "GT" / "images" / entry["image"]
            mask_out = out / "GT" / "labels" / f"{figaro1k.mask_stem(entry['annotation'])}-gt.pbm"
            if split in full:
                shutil.copyfile(image_path, image_out)
                if mask_path.suffix == ".pbm":
                    shutil.copyfile(mask_path, mask_out)
                    continue
            image, mask = figaro1k.read_example(image_path, mask_path)
            if split not in full:
                image, mask = device_augment.shrink(image, mask, max_side)
                Image.fromarray(image).save(image_out, quality=quality)
            Image.fromarray(mask * 255).convert("1").save(mask_out)
    (out / "train_val_test.json").write_text(json.dumps(splits))


if __name__ == "__main__":
    main()
