"""Pictures of predictions (NumPy and PIL): hair tinted over photos, image | truth | prediction
panels for TensorBoard and the eval contact sheet, image files written whole."""

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hairseg_jax import files

HAIR_COLOUR = (255, 0, 160)
BACKGROUND = 48  # grey around pictures that do not fill their box
CAPTION_HEIGHT = 16


def save(path: str | os.PathLike, pixels: np.ndarray, **options) -> None:
    """Writes ``pixels`` (uint8) as an image in the format of ``path``'s suffix (PIL's
    ``options``, e.g. ``quality``), whole or not at all: a full disk leaves no broken file."""
    data = io.BytesIO()
    image_format = Image.registered_extensions()[Path(path).suffix.lower()]
    Image.fromarray(pixels).save(data, format=image_format, **options)
    files.write_atomically(path, data.getvalue())


TINT_ROWS = 256


def tint(
    image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = HAIR_COLOUR, alpha: float = 0.5
) -> np.ndarray:
    """uint8 RGB ``image`` with the pixels where ``mask`` (boolean or 0/1) is set blended
    towards ``colour``."""
    mask = np.asarray(mask) > 0  # a 0/1 integer mask would index rows 0 and 1
    out = image.copy()
    colour = alpha * np.asarray(colour, np.float32)
    # By blocks of rows: a photo may have 179 megapixels, and its float copy several GB.
    for top in range(0, len(out), TINT_ROWS):
        rows, hair = out[top : top + TINT_ROWS], mask[top : top + TINT_ROWS]
        rows[hair] = np.round((1 - alpha) * rows[hair].astype(np.float32) + colour)
    return out


def fit(picture: np.ndarray, box: int) -> np.ndarray:
    """A uint8 RGB (H, W, 3) or 0/1 mask (H, W) picture scaled to fit a ``box`` square, keeping
    its aspect ratio, centred on grey: uint8 (box, box, 3)."""
    if picture.ndim == 2:
        picture = np.repeat((picture > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
    height, width = picture.shape[:2]
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))
    canvas = np.full((box, box, 3), BACKGROUND, np.uint8)
    top, left = (box - size[1]) // 2, (box - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = resized
    return canvas


def panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, box: int) -> np.ndarray:
    """image | true mask | predicted mask side by side: uint8 (box, 3 * box, 3)."""
    return np.concatenate([fit(image, box), fit(truth, box), fit(prediction, box)], axis=1)


def contact_sheet(panels: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    """Panels stacked top to bottom, each under a one-line caption: uint8 RGB."""
    rows = []
    for picture, caption in zip(panels, captions, strict=True):
        strip = Image.new("RGB", (picture.shape[1], CAPTION_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(strip).text((4, 2), caption, fill=(255, 255, 255))
        rows += [np.asarray(strip), picture]
    return np.concatenate(rows, axis=0)
