"""Predict mode: hair masks and overlays for any image files, from a workdir's best checkpoint.

    python main.py --config=configs/figaro.py --workdir=runs/x --config.mode=predict \
        --config.predict.input='photos/*.jpg' --config.predict.output=masks/

Each readable image (JPEG, PNG incl. RGBA, grey and 16-bit, WebP, BMP, TIFF, GIF; up to
Pillow's 179 megapixels; EXIF orientation applied) is resized to a ``predict.image_size``
square like eval resizes, the logits are resized back to the image's own size, and
``<name>_mask.png`` (0/255), ``<name>_overlay.jpg`` (hair tinted) and optionally
``<name>_prob.png`` / ``.npy`` are written.
Files that cannot be read (or whose outputs cannot be written: an image too large for JPEG, a
name too long or refused by the filesystem) are logged one line each and skipped; the summary
lists them.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import glob
import io
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, ImageOps

from hairseg_jax import config_checks, evaluate, pictures, sharding, steps
from hairseg_jax.data import figaro1k, whole_images
from hairseg_jax.files import write_atomically

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MASK_SUFFIX, OVERLAY_SUFFIX, PROB_SUFFIX = "_mask.png", "_overlay.jpg", "_prob"
# What write_outputs writes after an image's name.
OUTPUT_SUFFIXES = (MASK_SUFFIX, OVERLAY_SUFFIX, f"{PROB_SUFFIX}.png", f"{PROB_SUFFIX}.npy")
LOG_EVERY_SECONDS = 10.0
JPEG_MAX_SIDE = 65500
# Errors of a file's own name (None: an encoder's), as opposed to the folder's or the disk's.
NAME_ERRNOS = (None, errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ)


def _file_or_broken_link(path: Path) -> bool:
    """A file (not a folder, a FIFO, ...), or a link to nothing (or to itself)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def find_inputs(spec: str) -> list[Path]:
    """The files ``spec`` names: one file, or the image files (by suffix, not hidden) of a
    folder or matching a glob pattern (``**`` recurses), sorted. A broken link counts as a
    file, to be reported as one that cannot be read rather than passed over.

    Raises:
      FileNotFoundError: nothing matches.
    """
    path = Path(spec)
    if _file_or_broken_link(path):
        return [path]
    found = path.iterdir() if path.is_dir() else map(Path, glob.glob(str(path), recursive=True))
    files = [  # not hidden files (macOS's "._x.jpg" beside x.jpg), as a glob leaves them out
        p
        for p in found
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and _file_or_broken_link(p)
    ]
    if not files:
        raise FileNotFoundError(
            f"No images at config.predict.input={spec!r} (a file, a folder of images or a glob "
            "pattern)."
        )
    return sorted(files)


def without_outputs(files: Sequence[Path], output: Path) -> list[Path]:
    """``files`` less the masks, overlays and probability maps that an earlier run wrote: in
    ``output`` (the input folder may be the output folder), and in any other folder those of
    an image among ``files`` (beside it, or in an earlier run's output folder that a ``**``
    pattern reaches).

    Raises:
      FileNotFoundError: nothing else is left.
    """
    output = output.resolve()
    sources = set()  # the names that the outputs of ``files``' images take
    for f in files:
        if not f.name.endswith(OUTPUT_SUFFIXES):
            sources.update({f.stem, f.name.replace(".", "_")})

    def earlier_output(f: Path) -> bool:
        suffix = next((s for s in OUTPUT_SUFFIXES if f.name.endswith(s)), None)
        if suffix is None:
            return False
        name = f.name.removesuffix(suffix)
        uncounted = re.sub(r"_[0-9]+$", "", name)  # output_names' a_jpg_2 for a second a.jpg
        return f.resolve().parent == output or name in sources or uncounted in sources

    kept = [f for f in files if not earlier_output(f)]
    if len(kept) < len(files):  # by their names: a photo named x_mask.png beside x.jpg too
        left_out = [str(f) for f in files if f not in kept]
        logging.info(
            "Leaving out %d files named as the outputs of an earlier run: %s%s",
            len(left_out),
            ", ".join(left_out[:5]),
            ", ..." if len(left_out) > 5 else ".",
        )
    if not kept:
        raise FileNotFoundError(f"The only images at config.predict.input are outputs in {output}.")
    return kept


def output_names(files: Sequence[Path]) -> list[str]:
    """The output name of each file: its stem, or where two files share a stem (``a.jpg`` and
    ``a.png``) its name with the dot replaced by "_", with a counter (``a_jpg_2``) where that
    is taken. A file's own stem is never another file's name (``a_jpg.png`` keeps ``a_jpg``),
    and names differ in more than case (``B.JPG`` and ``b.jpg``: a Mac's or Windows' disk
    would hold one ``b_mask.png``)."""
    stems = collections.Counter(f.stem.casefold() for f in files)
    used = {stem for stem, count in stems.items() if count == 1}  # kept by their own files
    names = []
    for f in files:
        if stems[f.stem.casefold()] == 1:
            names.append(f.stem)
            continue
        base = name = f.name.replace(".", "_")
        count = 1
        while name.casefold() in used:
            count += 1
            name = f"{base}_{count}"
        used.add(name.casefold())
        names.append(name)
    return names


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 RGB (H, W, 3), as it is meant to be seen.

    EXIF orientation is applied; transparency is composited over white; grey, palette and
    CMYK images are converted; 16-bit images keep their top 8 bits.
    """
    with Image.open(path) as image:
        image.load()  # decode now, so truncated files fail here
        image = ImageOps.exif_transpose(image)
        if image.mode in figaro1k.WIDE_GREY_MODES:  # PIL would clip these to 8 bits for RGBA
            rgb = figaro1k.to_rgb(image)
            if "transparency" in image.info:  # the one grey value that is transparent
                opaque = np.asarray(image) != image.info["transparency"]
                rgb = np.where(opaque[..., None], rgb, np.uint8(255))
            return rgb
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return figaro1k.to_rgb(image)


@dataclasses.dataclass
class _Loaded:
    """One input: the decoded photo and its model-sized copy, or why it could not be read."""

    path: Path
    name: str
    image: np.ndarray | None = None
    resized: np.ndarray | None = None
    error: str = ""


# The file each loader thread is reading, for the warnings it raises.
_reading = threading.local()


def _load(path: Path, name: str, image_size: int) -> _Loaded:
    _reading.path = path
    try:
        image = read_photo(path)
        return _Loaded(path, name, image, whole_images.resize_image(image, image_size))
    except MemoryError:  # the host's, e.g. for a mistyped predict.image_size: not the file's
        raise
    except Exception as e:  # noqa: BLE001  (any undecodable file is reported and skipped)
        return _Loaded(path, name, error=f"{type(e).__name__}: {e}".replace("\n", " "))
    finally:
        _reading.path = None


@contextlib.contextmanager
def warnings_naming_their_file() -> Iterator[None]:
    """Within it, a warning raised while a thread reads an input (Pillow's for a possible
    decompression bomb, corrupt EXIF data, ...) is logged with the file's name, each time:
    Python would print it once, with Pillow's source line instead of the file."""
    with warnings.catch_warnings():  # restores the filters and ``showwarning`` after
        warnings.filterwarnings("always", module="PIL")
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
            path = getattr(_reading, "path", None)
            if path is None:
                show(message, category, filename, lineno, file, line)
            else:
                logging.warning("%s: %s: %s", escaped(path), category.__name__, message)

        warnings.showwarning = showwarning
        yield


def write_outputs(
    output: Path, name: str, image: np.ndarray, logits: np.ndarray, threshold: float, prob: str
) -> None:
    """Writes the mask, the overlay and (``prob`` "png" or "npy") the probability map of one
    image from its model-sized logits (h, w)."""
    height, width = image.shape[:2]
    logits = evaluate.resize_logits(logits, height, width)
    mask = logits > evaluate.logit(threshold)
    # Each file whole or not at all (pictures.save): a full disk leaves no broken one.
    pictures.save(output / f"{name}{MASK_SUFFIX}", mask.astype(np.uint8) * 255)
    if prob:
        probability = 1 / (1 + np.exp(-logits.astype(np.float64)))
        path = output / f"{name}{PROB_SUFFIX}.{prob}"
        if prob == "npy":
            data = io.BytesIO()
            np.save(data, probability.astype(np.float32))
            write_atomically(path, data.getvalue())
        else:
            pictures.save(path, np.round(probability * 255).astype(np.uint8))
    if max(height, width) > JPEG_MAX_SIDE:  # Pillow's own error reads "broken data stream"
        raise ValueError(f"the overlay's {width}x{height} px exceed JPEG's {JPEG_MAX_SIDE} px")
    pictures.save(output / f"{name}{OVERLAY_SUFFIX}", pictures.tint(image, mask), quality=90)


def write_or_explain(
    output: Path, name: str, image: np.ndarray, logits: np.ndarray, threshold: float, prob: str
) -> str:
    """``write_outputs``; "" if it wrote them all, else why not, where the image itself is the
    cause (an encoder's limit: JPEG's 65,500 px side; a name too long, or one the output's
    filesystem refuses, as FAT, exFAT and SMB do names with ``:`` or ``?``). A full disk or a
    folder that cannot be written raises."""
    try:
        write_outputs(output, name, image, logits, threshold, prob)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno not in NAME_ERRNOS:
            raise
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    return ""


def escaped(path: str | Path) -> str:
    """``path`` with its unprintable characters (a newline in a file's name) escaped, so that
    each log line stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(path))


def log_progress(done: int, total: int, failed: int, start: float) -> float:
    """Logs predict's progress line (``done`` of ``total`` files, ``failed`` of them so far,
    since ``start``); returns the time it was logged."""
    now = time.perf_counter()
    rate = done / (now - start)
    logging.info(
        "Predict: %d/%d files (%d failed), %.1f images/s, ETA %.0f s.",
        done,
        total,
        failed,
        rate,
        (total - done) / rate,
    )
    return now


def failure_line(summary: dict[str, Any]) -> str:
    """One line naming the files that could not be read, or their outputs written."""
    failed = [escaped(path) for path in summary["failed"]]
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return f"{len(failed)} of {summary['num_files']} input files could not be predicted: {shown}"


def shared_by_process_0(
    unwritten: set[Path],
    chunk: Sequence[tuple[Path, str]],
    stop: Exception | None,
    batch_size: int,
) -> list[Path]:
    """The files of ``chunk`` (at most ``batch_size``) whose outputs process 0 could not write,
    on every process: only process 0 writes, and every process reports the same failures and
    exit status. ``stop``, process 0's error that ends its run (a full disk), is raised by
    every process, where the others would wait for it in the next batch's prediction."""
    if jax.process_count() > 1:
        flags = np.zeros(batch_size + 1, np.int32)  # one shape: one compiled broadcast
        flags[: len(chunk)] = [path in unwritten for path, _ in chunk]
        flags[-1] = stop is not None
        flags = multihost_utils.broadcast_one_to_all(flags)
        unwritten = {path for (path, _), bad in zip(chunk, flags, strict=False) if bad}
        if flags[-1] and stop is None:
            stop = OSError("Process 0 cannot write predict's outputs (its log says why).")
    if stop is not None:
        raise stop
    return [path for path, _ in chunk if path in unwritten]


def predict(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Predicts masks of ``config.predict.input`` with ``workdir``'s best checkpoint.

    Images are read and resized on a thread pool one batch ahead of the device, batched to
    one compiled shape, and their outputs written on the pool while the next batch runs.
    The threshold is ``config.predict.threshold``, or with -1 the workdir's tuned one (else
    0.5); ``config.predict.tta="flip"`` averages with the mirror image.

    Returns:
      ``{"num_files", "num_written", "failed" (paths), "output", "threshold",
      "threshold_source", "seconds"}``.
    """
    start = time.perf_counter()
    pc = config.predict
    workdir = Path(workdir)
    output = Path(pc.output)
    files = without_outputs(find_inputs(pc.input), output)
    names = output_names(files)
    for file, name in zip(files, names, strict=True):
        if name != file.stem:  # the only record of which photo these outputs are
            logging.info("The outputs of %s are named %s_*.", file, name)
    leader = jax.process_index() == 0
    mesh = sharding.data_mesh()
    state, weights, step = evaluate.load_state(config, workdir, mesh)
    # After the weights are found (a run that cannot predict makes no folder), by every
    # process: one stopping alone would leave the others waiting in the first prediction.
    config_checks.make_folder(output, "predict.output")
    settings = evaluate.predictor_settings(config, "predict")
    threshold, source = evaluate.resolve_threshold(
        pc.threshold,
        workdir,
        step,
        settings,
        digest=functools.partial(evaluate.weights_digest, state),
    )
    image_size = settings["image_size"]
    batch_size = sharding.padded_batch_size(pc.batch_size, mesh)
    predict_fn = steps.jit_predict(config, mesh, tta=pc.tta)
    logging.info(
        "Predicting %d file%s with %s at %d px, threshold %.2f (%s), TTA %s, into %s.",
        len(files),
        "" if len(files) == 1 else "s",
        weights,
        image_size,
        threshold,
        source,
        pc.tta,
        output,
    )

    failed, written, last_log = [], 0, start
    chunks = [
        list(zip(files[i : i + batch_size], names[i : i + batch_size], strict=True))
        for i in range(0, len(files), batch_size)
    ]
    with (
        warnings_naming_their_file(),
        concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
    ):

        def submit(chunk):
            return [pool.submit(_load, path, name, image_size) for path, name in chunk]

        def finish(writing, chunk) -> int:
            """Waits for ``writing``'s (path, future) pairs, the outputs of ``chunk``; the
            number that failed, on every process (``shared_by_process_0``)."""
            unwritten, stop = set(), None
            try:
                for path, future in writing:
                    if error := future.result():
                        logging.warning(
                            "Skipping %s: cannot write its outputs (%s).", escaped(path), error
                        )
                        unwritten.add(path)
            except Exception as e:  # a full disk, ...: every process stops
                stop = e
            unwritten = shared_by_process_0(unwritten, chunk, stop, batch_size)
            failed.extend(str(path) for path in unwritten)
            return len(unwritten)

        loading, writing = submit(chunks[0]), []
        for k in range(len(chunks)):
            loaded = [future.result() for future in loading]
            loading = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            for item in loaded:
                if item.error:
                    logging.warning(
                        "Skipping %s: cannot read it (%s).", escaped(item.path), item.error
                    )
                    failed.append(str(item.path))
            good = [item for item in loaded if not item.error]
            if good:
                batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
                batch[: len(good)] = [item.resized for item in good]
                images = sharding.shard_batch(batch, mesh, whole=True)
                logits = np.asarray(jax.device_get(predict_fn(state, images)))[..., 0]
            if k:  # the previous batch's files, before starting on these
                written -= finish(writing, chunks[k - 1])
            writing = []
            if good and leader:
                writing = [
                    (
                        item.path,
                        pool.submit(
                            write_or_explain,
                            output,
                            item.name,
                            item.image,
                            logits[i],
                            threshold,
                            pc.save_prob,
                        ),
                    )
                    for i, item in enumerate(good)
                ]
            written += len(good)
            if time.perf_counter() - last_log >= LOG_EVERY_SECONDS and k + 1 < len(chunks):
                last_log = log_progress(written + len(failed), len(files), len(failed), start)
        written -= finish(writing, chunks[-1])
        log_progress(len(files), len(files), len(failed), start)  # every write's outcome known

    summary = {
        "num_files": len(files),
        "num_written": written,
        "failed": failed,
        "output": str(output),
        "threshold": threshold,
        "threshold_source": source,
        "seconds": time.perf_counter() - start,
    }
    logging.info(
        "Predicted %d of %d files into %s in %.1f s; %d failed.",
        written,
        len(files),
        output,
        summary["seconds"],
        len(failed),
    )
    return summary
