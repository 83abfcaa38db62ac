"""Synthetic head-and-hair pictures with exact masks, so training can run without a dataset."""

import numpy as np

from hairseg_jax.data.examples import Examples

_SKIN = np.array(
    [
        (255, 224, 196),
        (241, 194, 160),
        (224, 172, 130),
        (198, 134, 96),
        (141, 85, 54),
        (95, 60, 40),
    ],
    np.float32,
)
_HAIR = np.array(
    [
        (22, 18, 16),
        (55, 36, 24),
        (95, 62, 38),
        (130, 64, 34),
        (196, 160, 104),
        (226, 204, 150),
        (150, 146, 140),
    ],
    np.float32,
)


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    """Returns the boolean mask of the ellipse with centre (cy, cx) and semi-axes (ry, rx)."""
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float) -> np.ndarray:
    """Returns the colour shifted by up to `amount` per channel."""
    return colour + rng.uniform(-amount, amount, 3)


def _render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws one picture; returns the uint8 image (H, W, 3) and the uint8 hair mask (H, W)."""
    y, x = np.meshgrid(
        np.arange(height, dtype=np.float32) / height,
        np.arange(width, dtype=np.float32) / width,
        indexing="ij",
    )

    # Background: a gradient between two random colours along a random direction, plus soft waves.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)
    start, stop = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    image = start + ramp[..., None] * (stop - start)
    for _ in range(3):
        fy, fx = rng.uniform(1, 4, 2)
        wave = np.sin(2 * np.pi * (fy * y + rng.uniform()) + np.sin(2 * np.pi * fx * x))
        image += wave[..., None] * rng.uniform(-20, 20, 3)

    # Shoulders and face.
    cy, cx = rng.uniform(0.45, 0.62), rng.uniform(0.35, 0.65)
    ry = rng.uniform(0.17, 0.26)
    rx = ry * rng.uniform(0.7, 0.85) * height / width
    body = _ellipse(y, x, cy + ry * 2.3, cx, ry * 1.5, rx * 2.4)
    image[body] = rng.uniform(0, 255, 3)
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 12)
    face = _ellipse(y, x, cy, cx, ry, rx)
    shade = 1 - 0.25 * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    image[face] = (shade[..., None] * skin)[face]

    # Hair: a cap over the top of the face plus a few wavy strands hanging down its sides.
    hairline = cy - ry * rng.uniform(0.3, 0.6)
    cap = _ellipse(
        y,
        x,
        cy - ry * rng.uniform(0.15, 0.35),
        cx,
        ry * rng.uniform(1.0, 1.2),
        rx * rng.uniform(1.15, 1.45),
    )
    hair = cap & ~(face & (y > hairline))
    # Stripe coordinate: across the strands, bent by a wave along them.
    across = x * width + rng.uniform(0.5, 4) * np.sin(2 * np.pi * y * rng.uniform(2, 8))
    for _ in range(rng.integers(3, 8)):
        side = rng.choice((-1, 1))
        top = cy - ry * rng.uniform(0, 0.6)
        length = rng.uniform(0.2, 0.55)
        drop = y - top
        sway = rng.uniform(0.005, 0.03) * np.sin(
            2 * np.pi * (rng.uniform(1.5, 5) * drop + rng.uniform())
        )
        centre = cx + side * rx * rng.uniform(0.6, 1.1) + rng.uniform(-0.04, 0.04) * drop + sway
        half_width = rng.uniform(0.02, 0.045) * (1 - 0.5 * np.clip(drop / length, 0, 1))
        hair |= (drop >= 0) & (drop <= length) & (np.abs(x - centre) <= half_width)
    period = rng.uniform(2, 5)
    stripes = 0.8 + 0.2 * np.sin(2 * np.pi * across / period + rng.uniform(0, 2 * np.pi))
    colour = _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 15)
    image[hair] = (stripes[..., None] * colour)[hair]

    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), hair.astype(np.uint8)


def make_examples(count: int, size: int | tuple[int, int] = 96, seed: int = 0) -> Examples:
    """Returns `count` synthetic pictures of `size` (an int for square, else (H, W)).

    Example i depends only on (seed, i), so a smaller count gives a prefix of a larger one.
    Names run "synthetic_00000", "synthetic_00001", ...
    """
    height, width = (size, size) if isinstance(size, int) else size
    if count < 0 or height < 1 or width < 1:
        raise ValueError(f"Need count >= 0 and a positive size; got {count} and {size}.")
    names, images, masks = [], [], []
    for i in range(count):
        image, mask = _render(np.random.default_rng([seed, i]), height, width)
        names.append(f"synthetic_{i:05d}")
        images.append(image)
        masks.append(mask)
    return Examples(names, images, masks)
