"""Checks of a config's values before any work starts: every problem named in one message."""

import difflib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import ml_collections
from flax import traverse_util

from hairseg_jax import cli
from hairseg_jax.data.figaro1k import MASK_SOURCES, SPLITS, DataError
from hairseg_jax.models.deeplab import BACKBONE_NAMES
from hairseg_jax.models.resnet import BACKBONES
from hairseg_jax.sharding import ShardingError, coordinator_port
from hairseg_jax.steps import TTA_MODES, NonFiniteError
from hairseg_jax.weights.tensors import ConversionError

MODES = ("train", "eval", "predict")
WHOLE_NUMBER_TUPLES = ("data.progressive_sizes", "eval.tta_sizes", "model.multi_grid")
PROB_FORMATS = ("", "png", "npy")
# The fields configs/synthetic.py adds to configs/figaro.py's (``unknown_fields``).
SYNTHETIC_FIELDS = ("data.synthetic_size", "data.synthetic_counts.")
# The values of the ``distributed`` settings that leave them to be detected.
DISTRIBUTED_DETECTED = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


class ConfigError(ValueError):
    """A config value that cannot work."""


# What a run's input can be wrong in: its config, data, weights, files (a full disk, a damaged
# checkpoint), devices, or a diverging step. main.py and the benchmarks report these in one
# line, "FATAL <error>", rather than as a traceback.
USER_ERRORS = (ConfigError, ConversionError, DataError, OSError, ShardingError, NonFiniteError)


# Config fields that name files or folders (``expand_user``).
PATH_FIELDS = (
    "compilation_cache",
    "data.data_dir",
    "data.split_file",
    "model.pretrained",
    "predict.input",
    "predict.output",
)


def home_expanded(value: str, name: str) -> str:
    """``cli.home_expanded``, raising ConfigError."""
    try:
        return cli.home_expanded(value, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def folder_flag(value: str | None, name: str) -> Path:
    """The folder that the flag ``name`` gives, ``~`` expanded (``cli.home_expanded``). Raises
    ConfigError if the flag is empty (e.g. an unset shell variable), which would otherwise mean
    the current folder, or names a file."""
    if not value or not value.strip():
        raise ConfigError(f"{name} is empty: it must name a folder.")
    path = Path(home_expanded(value, name))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}={value!r} is a file, not a folder.")
    return path


def expand_user(config: ml_collections.ConfigDict) -> None:
    """Expands a leading ``~`` in ``config``'s ``PATH_FIELDS`` (``cli.home_expanded``), in place:
    a shell leaves ``--config.data.data_dir=~/Figaro1k`` as it is."""
    for field in PATH_FIELDS:
        *sections, name = field.split(".")
        parent = config
        for section in sections:
            parent = parent.get(section, {})
        value = parent.get(name)
        if isinstance(value, str) and value.startswith("~"):
            parent[name] = home_expanded(value, field)


def check_folder(path: str | os.PathLike, name: str) -> None:
    """Raises ConfigError where ``make_folder(path, name)`` would, as far as can be told without
    making anything: ``path`` or its nearest existing parent is a file, or a folder this user
    cannot write to."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name}={str(path)!r} cannot be made a folder ({existing} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == path.absolute():
            raise ConfigError(f"{name}={str(path)!r} is a folder this user cannot write to.")
        raise ConfigError(
            f"{name}={str(path)!r} cannot be made a folder ({existing} cannot be written to)."
        )


def make_folder(path: str | os.PathLike, name: str) -> Path:
    """Creates the folder ``path`` (and its parents) that ``name`` (a field or flag) gives, or
    raises ConfigError saying why it cannot be one (a file of that name, no permission, ...)
    or why it cannot be written to (read-only, another user's)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name}={str(path)!r} cannot be made a folder ({e}).") from e
    check_folder(path, name)  # now that it exists: whether it can be written to
    return Path(path)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """The config's impossible values, one readable phrase each (empty if none)."""
    # Every field has a value (a config file may set one to None; no field takes it), every
    # tuple field holds numbers (sizes and rates whole ones), and no number is infinite (it
    # passes the rules' comparisons); the rules below compare them as such.
    found = []
    for field, value in traverse_util.flatten_dict(config.to_dict(), sep=".").items():
        if value is None:
            found.append(f"{field}=None must be set to a value (no field takes None)")
        values = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, float) and math.isinf(v) for v in values):
            found.append(f"{field}={value!r} must be finite")
        if not isinstance(value, tuple | list):
            continue
        if not all(map(_is_number, value)):
            found.append(f"{field}={tuple(value)!r} must hold numbers")
        elif field in WHOLE_NUMBER_TUPLES and not all(isinstance(v, int) for v in value):
            found.append(f"{field}={tuple(value)!r} must hold whole numbers")
    if found:
        return found

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            value = config
            for part in field.split("."):
                value = value.get(part)  # None for a missing one
            found.append(f"{field}={value!r} {rule}")

    data, model, optim, train, ev = (
        config.data,
        config.model,
        config.optim,
        config.train,
        config.eval,
    )
    aug = config.augment
    need(config.mode in MODES, "mode", f"is not one of {MODES}")
    # JAX keys take 32 bits of the seed: a larger one would repeat a smaller one's draws.
    need(0 <= config.seed < 2**32, "seed", "must be in [0, 2**32)")
    dist = config.get("distributed") or {}  # a config.json from before it has none
    if not dist.get("enabled", False):  # else these settings would be ignored
        for setting in ("coordinator_address", "num_processes", "process_id"):
            detected = DISTRIBUTED_DETECTED[setting]
            need(
                dist.get(setting, detected) == detected,
                f"distributed.{setting}",
                "is set, but distributed.enabled is False: enable it to join the other processes",
            )
    processes, process = dist.get("num_processes", 0), dist.get("process_id", -1)
    need(processes >= 0, "distributed.num_processes", "must not be negative (0: detected)")
    need(process >= -1, "distributed.process_id", "must be -1 (detected) or more")
    if processes > 0 and process >= 0:
        need(
            process < processes,
            "distributed.process_id",
            f"must be below distributed.num_processes={processes}",
        )
    need(
        dist.get("initialization_timeout", 1) > 0,
        "distributed.initialization_timeout",
        "must be positive",
    )
    address = dist.get("coordinator_address", "")
    need(
        not address or coordinator_port(address) is not None,
        "distributed.coordinator_address",
        "must be HOST:PORT (process 0's), PORT in 1-65535",
    )
    need(data.dataset in ("figaro1k", "synthetic"), "data.dataset", "is not figaro1k or synthetic")
    need(data.mask_source in MASK_SOURCES, "data.mask_source", f"is not one of {MASK_SOURCES}")
    if data.dataset == "figaro1k" and config.mode != "predict":  # e.g. an unset shell variable
        need(data.data_dir.strip() != "", "data.data_dir", "must name the Figaro1k folder")
        need(data.split_file.strip() != "", "data.split_file", "must name the split file")
    if data.dataset == "synthetic":
        need(
            "synthetic_size" in data,
            "data.dataset",
            "needs data.synthetic_size and _counts: start from configs/synthetic.py",
        )
        if "synthetic_size" in data:
            need(data.synthetic_size > 0, "data.synthetic_size", "must be positive")
            counts = data.get("synthetic_counts") or {}
            for split in ("train", "val", "test"):
                need(counts.get(split, 0) > 0, f"data.synthetic_counts.{split}", "must be positive")
    for field in ("max_train_images", "max_val_images"):
        need(data[field] >= 0, f"data.{field}", "must not be negative (0: all)")
    need(data.image_size > 0, "data.image_size", "must be positive")
    inp = config.input
    need(len(inp.mean) in (1, 3), "input.mean", "must hold 1 value (for all channels) or 3")
    need(
        len(inp.std) in (1, 3) and min(inp.std, default=0) > 0,
        "input.std",
        "must hold 1 positive value (for all channels) or 3",
    )
    need(inp.channel_order in ("RGB", "BGR"), "input.channel_order", "must be RGB or BGR")
    sizes, ends = data.progressive_sizes, [0.0, *data.progressive_until, 1.0]
    need(all(size > 0 for size in sizes), "data.progressive_sizes", "must be positive")
    need(
        len(ends) == len(sizes) + 2 and all(a < b for a, b in itertools.pairwise(ends)),
        "data.progressive_until",
        "must hold one fraction in (0, 1) per progressive size, increasing",
    )
    need(model.backbone in BACKBONE_NAMES, "model.backbone", f"is not one of {BACKBONE_NAMES}")
    need(model.output_stride in (8, 16, 32), "model.output_stride", "must be 8, 16 or 32")
    if model.backbone in BACKBONES:
        layer4_blocks = BACKBONES[model.backbone][0][3]
        need(
            len(model.multi_grid) >= layer4_blocks and min(model.multi_grid) > 0,
            "model.multi_grid",
            f"must hold a positive rate for each of layer4's {layer4_blocks} blocks",
        )
    need(model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    for width in ("aspp_channels", "decoder_channels"):
        need(model[width] > 0, f"model.{width}", "must be positive")
    need(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)")
    need(optim.name in ("sgd", "adamw"), "optim.name", "must be sgd or adamw")
    need(optim.learning_rate > 0, "optim.learning_rate", "must be positive")
    need(optim.schedule in ("poly", "cosine", "constant"), "optim.schedule", "is unknown")
    need(optim.weight_decay >= 0, "optim.weight_decay", "must not be negative")
    need(0 <= optim.momentum < 1, "optim.momentum", "must be in [0, 1)")
    need(optim.poly_power > 0, "optim.poly_power", "must be positive")
    need(optim.head_lr_multiplier > 0, "optim.head_lr_multiplier", "must be positive")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", "must not be negative")
    need(config.loss.dice_weight >= 0, "loss.dice_weight", "must not be negative")
    # As torch refuses: ASPP's image-pooling BatchNorm normalises over the batch alone.
    need(train.batch_size > 1, "train.batch_size", "must be at least 2 (BatchNorm over the batch)")
    need(train.num_steps >= 0, "train.num_steps", "must not be negative")
    need(train.num_steps > 0 or train.num_epochs > 0, "train.num_epochs", "must be positive")
    need(train.log_every_steps > 0, "train.log_every_steps", "must be positive")
    need(train.eval_every_steps >= 0, "train.eval_every_steps", "must not be negative")
    need(train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must not be negative")
    need(train.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
    need(0 <= train.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    need(ev.split in SPLITS, "eval.split", f"is not one of {SPLITS}")
    need(ev.image_size > 0, "eval.image_size", "must be positive")
    need(ev.batch_size > 0, "eval.batch_size", "must be positive")
    need(ev.max_images >= 0, "eval.max_images", "must not be negative (0: all)")
    threshold_rule = "must be in (0, 1), or -1 for the tuned one"
    need(0 < ev.threshold < 1 or ev.threshold == -1, "eval.threshold", threshold_rule)
    need(ev.tta in TTA_MODES, "eval.tta", f"is not one of {TTA_MODES}")
    need(all(size > 0 for size in ev.tta_sizes), "eval.tta_sizes", "must be positive")
    need(
        len({ev.image_size, *ev.tta_sizes}) == len(ev.tta_sizes) + 1,
        "eval.tta_sizes",
        "must not repeat a size or eval.image_size (each size would count twice)",
    )
    need(ev.preview_images >= 0, "eval.preview_images", "must not be negative")
    pr = config.predict
    need(0 < pr.threshold < 1 or pr.threshold == -1, "predict.threshold", threshold_rule)
    need(pr.tta in TTA_MODES, "predict.tta", f"is not one of {TTA_MODES}")
    need(pr.image_size >= 0, "predict.image_size", "must not be negative")
    need(pr.batch_size > 0, "predict.batch_size", "must be positive")
    need(pr.save_prob in PROB_FORMATS, "predict.save_prob", f"is not one of {PROB_FORMATS}")
    if config.mode == "predict":
        need(bool(pr.input), "predict.input", "must name an image, a folder or a glob pattern")
        need(bool(pr.output), "predict.output", "must name the output folder")
    need(
        len(aug.scale) == 2 and 0 < aug.scale[0] <= aug.scale[1] <= 1,
        "augment.scale",
        "must be (low, high) with 0 < low <= high <= 1",
    )
    need(
        len(aug.ratio) == 2 and 0 < aug.ratio[0] <= aug.ratio[1],
        "augment.ratio",
        "must be (low, high) with 0 < low <= high",
    )
    for name in ("rotation", "brightness"):
        need(aug[name] >= 0, f"augment.{name}", "must not be negative")
    # Their factors are drawn from [1 - x, 1 + x]: below 0 would invert the image's colours
    # (TensorFlow refuses it).
    for factor in ("contrast", "saturation"):
        need(0 <= aug[factor] <= 1, f"augment.{factor}", "must be in [0, 1]")
    need(0 <= aug.hue <= 0.5, "augment.hue", "must be in [0, 0.5]")
    need(aug.device_max_side > 0, "augment.device_max_side", "must be positive")
    return found


# Fields that may differ from a workdir's saved config.json when training resumes there: they
# change what is logged, evaluated, predicted or kept, where the data folder is or how hosts
# start, not what is trained. A name covers its subfields.
RESUMABLE_FIELDS = (
    "mode",
    "compilation_cache",
    "eval",
    "predict",
    "distributed",
    "data.data_dir",
    "data.max_val_images",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.skip_nonfinite",
    "train.allow_config_change",
)


def saved_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The config training saved in ``workdir/config.json``, parsed; None if there is none.

    Raises:
      ConfigError: the file is not readable JSON, or not a JSON object.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not readable JSON ({e}).") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a config (a JSON object of its fields).")
    return saved


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """The fields that matter where ``config`` differs from ``saved``, as "field: old -> new".

    Args:
      saved: a workdir's ``config.json``, parsed.
      config: the new config.

    Fields in ``RESUMABLE_FIELDS`` are not compared, nor fields that only one of the two has
    (added or removed by another version of the code).
    """
    old = traverse_util.flatten_dict(saved, sep=".")
    new = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    resumable = lambda field: any(  # noqa: E731
        field == name or field.startswith(name + ".") for name in RESUMABLE_FIELDS
    )
    return [
        f"{field}: {old[field]!r} -> {new[field]!r}"
        for field in sorted(old.keys() & new.keys())
        if old[field] != new[field] and not resumable(field)
    ]


def missing_fields(
    config: ml_collections.ConfigDict, template: ml_collections.ConfigDict
) -> list[str]:
    """The fields of ``template`` that ``config`` lacks, a whole missing section by its name."""
    missing = []
    for field in traverse_util.flatten_dict(template.to_dict(), sep="."):
        parts, node = field.split("."), config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict | dict):  # a section set to a value
                name = ".".join(parts[:depth])
            elif part not in node:
                name = ".".join(parts[: depth + 1])
            else:
                node = node[part]
                continue
            missing += [name] if name not in missing else []
            break
    return missing


def unknown_fields(
    config: ml_collections.ConfigDict, template: ml_collections.ConfigDict
) -> list[str]:
    """The fields of ``config`` that ``template`` lacks (a config file's typo, which nothing
    would read), a whole unknown section by its name, each with the template's closest field
    or section where one is close; ``SYNTHETIC_FIELDS`` are known."""
    fields = set(traverse_util.flatten_dict(template.to_dict(), sep="."))
    sections = {f.rsplit(".", d)[0] for f in fields for d in range(1, f.count(".") + 1)}
    known = fields | sections
    unknown: dict[str, set[str]] = {}  # name: the known names of its kind (field or section)
    for field in traverse_util.flatten_dict(config.to_dict(), sep="."):
        if field in known or field.startswith(SYNTHETIC_FIELDS):
            continue  # a section set to a value is missing its fields (``missing_fields``)
        parts = field.split(".")
        depth = next(d for d in range(1, len(parts) + 1) if ".".join(parts[:d]) not in sections)
        name = ".".join(parts[:depth])
        if name not in fields:  # else a value made a section, which problems() names
            unknown[name] = sections if depth < len(parts) else fields
    named = []
    for name, kind in unknown.items():
        parent, _, last = name.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
        close = difflib.get_close_matches(
            last, sorted(s for s in siblings if siblings[s] in kind), 1
        )
        close = close or difflib.get_close_matches(last, sorted(siblings), 1)
        named.append(repr(name) + (f" (did you mean {siblings[close[0]]!r}?)" if close else ""))
    return named


def check_config(
    config: ml_collections.ConfigDict, template: ml_collections.ConfigDict | None = None
) -> None:
    """Raises ConfigError naming every impossible value of ``config``, or a field it lacks:
    any of ``template``'s (the fields every config file has, e.g. configs/figaro.py's) where
    given, else one the checks read; and, given ``template``, every field it has that
    ``template`` lacks."""
    missing = unknown = ""
    if template is not None:
        missing = ", ".join(map(repr, missing_fields(config, template)))
        unknown = ", ".join(unknown_fields(config, template))
    try:
        found = problems(config)
    except (AttributeError, KeyError) as e:  # ConfigDict's, for a missing field
        missing = missing or str(cli.innermost(e))
    if missing:
        raise ConfigError(
            f"Bad config: it has no field {missing}. A config file should start from one of "
            "configs/*.py (e.g. configs.figaro.get_config()) and change fields."
        )
    if unknown:
        raise ConfigError(
            f"Bad config: no such field {unknown}. A config file changes the fields of "
            "configs/figaro.py's get_config() and adds none."
        )
    if found:
        raise ConfigError("Bad config: " + "; ".join(found) + ".")
