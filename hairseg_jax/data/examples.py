"""The in-memory form of a dataset split: decoded images and binary masks."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Examples:
    """Parallel lists of decoded examples of one split.

    Attributes:
        names: frame names without extension, e.g. ``"Frame00001"``.
        images: uint8 RGB arrays of shape (H, W, 3), sizes may differ between examples.
        masks: uint8 arrays of shape (H, W) holding 0 (background) or 1 (hair), each the
            size of its image.
        skipped: the names of the split's examples left out as unreadable
            (``data.skip_unreadable``).
    """

    names: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    skipped: tuple[str, ...] = ()

    def __post_init__(self):
        if not len(self.names) == len(self.images) == len(self.masks):
            raise ValueError(
                f"Examples need as many names, images and masks; got {len(self.names)}, "
                f"{len(self.images)} and {len(self.masks)}."
            )

    def __len__(self) -> int:
        return len(self.names)

    def take(self, count: int | None) -> "Examples":
        """Returns the first ``count`` examples (all of them for ``None``), and the skipped."""
        return Examples(self.names[:count], self.images[:count], self.masks[:count], self.skipped)
