"""Which examples a config names: a Figaro1k split or synthetic images."""

import ml_collections

from hairseg_jax.data import figaro1k, synthetic
from hairseg_jax.data.examples import Examples


def load_examples(config: ml_collections.ConfigDict, split: str, limit: int = 0) -> Examples:
    """``limit`` examples (0: all) spread over ``split`` of ``config.data``'s dataset."""
    data = config.data
    if data.dataset == "synthetic":
        count = min(limit or data.synthetic_counts[split], data.synthetic_counts[split])
        seed = config.seed + figaro1k.SPLITS.index(split) * 1_000_003
        return synthetic.make_examples(count, size=data.synthetic_size, seed=seed)
    if data.dataset == "figaro1k":
        return figaro1k.read_split(
            data.data_dir,
            split,
            split_file=data.split_file,
            mask_source=data.mask_source,
            limit=limit,
            skip_unreadable=data.skip_unreadable,
        )
    raise ValueError(f"Unknown dataset {data.dataset!r}; use figaro1k or synthetic.")


def locate_examples(config: ml_collections.ConfigDict, limits: dict[str, int]) -> None:
    """Finds the files of the splits ``limits`` names (``{split: limit}``, as
    ``load_examples``) without decoding any: a DataError for the first split missing some,
    rather than after another split's long read. Warnings about the split file are left to
    ``load_examples``."""
    data = config.data
    if data.dataset == "figaro1k":
        for split, limit in limits.items():
            figaro1k.locate_split(
                data.data_dir, split, data.split_file, data.mask_source, limit, warn=False
            )
