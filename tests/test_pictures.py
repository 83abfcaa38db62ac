"""Pictures of predictions: the hair tint and the boxes of TensorBoard panels."""

import tracemalloc

import numpy as np
from PIL import Image

from hairseg_jax import pictures


def test_tint_blends_the_mask_towards_the_colour_and_leaves_the_rest():
    image = np.array([[[0, 0, 0], [200, 100, 50]], [[10, 20, 30], [255, 255, 255]]], np.uint8)
    mask = np.array([[True, False], [False, True]])
    out = pictures.tint(image, mask, colour=(100, 0, 200), alpha=0.25)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    np.testing.assert_array_equal(out[mask], [[25, 0, 50], [216, 191, 241]])  # 0.75 x + 0.25 c
    assert out.dtype == np.uint8 and image[0, 0].tolist() == [0, 0, 0]  # not in place
    ones = pictures.tint(image, mask.astype(np.uint8), colour=(100, 0, 200), alpha=0.25)
    np.testing.assert_array_equal(ones, out)  # a 0/1 mask, not rows 0 and 1


def test_tint_of_a_large_photo_works_by_blocks_of_rows():
    """Several blocks, each pixel as the whole-image formula; the memory of about two copies
    of the photo (18 in float64 at once: 8 GB for a 13000 px square photo)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2 * pictures.TINT_ROWS + 7, 500, 3), np.uint8)
    mask = rng.random(image.shape[:2]) < 0.5
    expected = image.copy()
    expected[mask] = np.round(0.5 * image[mask] + 0.5 * np.array(pictures.HAIR_COLOUR))
    np.testing.assert_array_equal(pictures.tint(image, mask), expected)
    tall = np.zeros((16 * pictures.TINT_ROWS, 300, 3), np.uint8)
    tracemalloc.start()
    pictures.tint(tall, np.ones(tall.shape[:2], bool))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * tall.nbytes, peak / tall.nbytes


def test_fit_keeps_the_aspect_ratio_centred_on_grey():
    mask = np.ones((20, 40), np.uint8)
    box = pictures.fit(mask, 10)  # 40x20 -> 10x5, rows 2-6 of 10
    assert box.shape == (10, 10, 3) and box.dtype == np.uint8
    assert (box[2:7] == 255).all()
    assert (box[:2] == pictures.BACKGROUND).all() and (box[7:] == pictures.BACKGROUND).all()
    panel = pictures.panel(np.zeros((20, 40, 3), np.uint8), mask, 1 - mask, 10)
    assert panel.shape == (10, 30, 3)
    assert (panel[2:7, :10] == 0).all() and (panel[2:7, 20:] == 0).all()


def test_save_writes_the_format_of_the_suffix_whole(tmp_path):
    """PNG exactly, JPEG with PIL's options; through files.write_atomically, so nothing but
    the file is left (a full disk leaves no broken one)."""
    y, x = np.mgrid[:32, :48]
    pixels = np.stack([4 * y, 5 * x, 2 * (x + y)], axis=-1).astype(np.uint8)  # smooth
    pictures.save(tmp_path / "a.png", pixels)
    pictures.save(tmp_path / "b.JPG", pixels, quality=95)
    pictures.save(tmp_path / "c.jpg", pixels, quality=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.JPG", "c.jpg"]
    with Image.open(tmp_path / "a.png") as png, Image.open(tmp_path / "b.JPG") as jpeg:
        assert (png.format, jpeg.format) == ("PNG", "JPEG")
        np.testing.assert_array_equal(np.asarray(png), pixels)
        assert np.abs(np.asarray(jpeg).astype(int) - pixels).mean() < 3
    assert (tmp_path / "c.jpg").stat().st_size < (tmp_path / "b.JPG").stat().st_size


def test_contact_sheet_puts_each_caption_above_its_panel():
    first = np.full((10, 30, 3), 77, np.uint8)
    second = np.full((10, 30, 3), 200, np.uint8)
    sheet = pictures.contact_sheet([first, second], ["a", "b"])
    h = pictures.CAPTION_HEIGHT
    assert sheet.shape == (2 * (h + 10), 30, 3)
    assert (sheet[h : h + 10] == 77).all() and (sheet[2 * h + 10 :] == 200).all()
    assert sheet[:h].max() > 0 and not (sheet[:h] == 77).all(axis=-1).any()  # text, not the panel
