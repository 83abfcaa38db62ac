"""Config value checks: the shipped configs pass, each impossible value is named."""

import ast
import inspect
import json
import os
import textwrap
from pathlib import Path

import ml_collections
import pytest
from flax import traverse_util

from configs import figaro, figaro_cpu, synthetic
from hairseg_jax import config_checks
from hairseg_jax.config_checks import ConfigError, check_config, config_changes, problems


@pytest.mark.parametrize(
    "config",
    [
        figaro.get_config(),
        figaro.get_config("smoke"),
        figaro.get_config("scratch"),
        synthetic.get_config(),
        figaro_cpu.get_config(),
    ],
    ids=["figaro", "smoke", "scratch", "synthetic", "figaro_cpu"],
)
def test_shipped_configs_pass(config):
    assert problems(config) == []
    check_config(config, template=figaro.get_config())  # main.py's template: all it has


def test_the_config_files_import_only_ml_collections_and_each_other():
    """So main.py answers a mistyped flag before JAX loads, and a config reads anywhere."""
    for path in sorted(Path(figaro.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            assert all(name.split(".")[0] in ("ml_collections", "configs") for name in names), (
                path.name,
                names,
            )


def test_a_config_lacking_fields_of_the_template_names_them_all():
    """Fields the checks do not read (a path, a switch) were found only when the run used
    them, after its folders and writers were made."""
    config = figaro.get_config()
    del config.augment["on_device"], config["compilation_cache"]
    with pytest.raises(ConfigError) as error:
        check_config(config, template=figaro.get_config())
    assert str(error.value).startswith(
        "Bad config: it has no field 'augment.on_device', 'compilation_cache'. A config file "
    )
    check_config(config)  # without the template, only the fields the checks read


def test_a_template_names_every_missing_field_even_one_the_checks_read():
    """augment.hue is read by problems() (a KeyError), augment.on_device is not: both named."""
    config = figaro.get_config()
    del config.augment["hue"], config.augment["on_device"]
    with pytest.raises(ConfigError) as error:
        check_config(config, template=figaro.get_config())
    assert str(error.value).startswith(
        "Bad config: it has no field 'augment.hue', 'augment.on_device'. A config file "
    )


def test_fields_the_template_lacks_are_named_with_the_closest_known_one():
    """A config file's typo (``config.train.num_stpes = 3``) was saved in config.json and
    read by nothing: the run trained its default steps."""
    config = figaro.get_config()
    config.train.num_stpes = 3
    config.modle = {"backbone": "resnet18", "output_stride": 8}
    config.model.foo = 1
    with pytest.raises(ConfigError) as error:
        check_config(config, template=figaro.get_config())
    assert str(error.value) == (
        "Bad config: no such field 'model.foo', 'modle' (did you mean 'model'?), "
        "'train.num_stpes' (did you mean 'train.num_steps'?). A config file changes the fields "
        "of configs/figaro.py's get_config() and adds none."
    )
    check_config(config)  # without the template, only the fields the checks read


def test_a_section_set_to_a_value_is_named_as_missing():
    """E.g. a config file's ``config.augment = None``: the section, not a TypeError."""
    fields = figaro.get_config().to_dict()
    fields["augment"] = None
    with pytest.raises(ConfigError, match="^Bad config: it has no field 'augment'. A config"):
        check_config(ml_collections.ConfigDict(fields), template=figaro.get_config())


# One impossible value per rule of problems(): (field set, value, the problem it gives). Every
# rule's field and text must appear here (test_every_rule_has_a_bad_value_case).
BAD_VALUES = [
    ("mode", "test", "mode='test' is not one of ('train', 'eval', 'predict')"),
    ("data.dataset", "celeba", "data.dataset='celeba' is not figaro1k or synthetic"),
    (
        "data.dataset",
        "synthetic",
        "data.dataset='synthetic' needs data.synthetic_size and _counts: start from "
        "configs/synthetic.py",
    ),
    (
        "data.mask_source",
        "png",
        "data.mask_source='png' is not one of ('auto', 'pbm', 'npy')",
    ),
    # E.g. an unset shell variable: the current folder, used if it held a Figaro1k layout.
    ("data.data_dir", "", "data.data_dir='' must name the Figaro1k folder"),
    ("data.split_file", " ", "data.split_file=' ' must name the split file"),
    ("data.max_train_images", -1, "data.max_train_images=-1 must not be negative (0: all)"),
    ("data.max_val_images", -2, "data.max_val_images=-2 must not be negative (0: all)"),
    ("data.image_size", 0, "data.image_size=0 must be positive"),
    ("input.mean", (0.5, 0.5), "input.mean=(0.5, 0.5) must hold 1 value (for all channels) or 3"),
    (
        "input.std",
        (1.0, 0.0, 1.0),
        "input.std=(1.0, 0.0, 1.0) must hold 1 positive value (for all channels) or 3",
    ),
    (
        "input.std",
        (1.0, 1.0),
        "input.std=(1.0, 1.0) must hold 1 positive value (for all channels) or 3",
    ),
    ("input.std", (), "input.std=() must hold 1 positive value (for all channels) or 3"),
    ("input.channel_order", "bgr", "input.channel_order='bgr' must be RGB or BGR"),
    ("data.progressive_sizes", (0,), "data.progressive_sizes=(0,) must be positive"),
    (
        "data.progressive_until",
        (0.5,),
        "data.progressive_until=(0.5,) must hold one fraction in (0, 1) per progressive size, "
        "increasing",
    ),
    (
        "model.backbone",
        "resnet13",
        "model.backbone='resnet13' is not one of ('resnet18', 'resnet34', 'resnet50', "
        "'resnet101', 'resnet152', 'mobilenet_v2')",
    ),
    ("model.output_stride", 4, "model.output_stride=4 must be 8, 16 or 32"),
    (
        "model.multi_grid",
        (1, 2),
        "model.multi_grid=(1, 2) must hold a positive rate for each of layer4's 3 blocks",
    ),
    (
        "model.multi_grid",
        (1, 0, 4),
        "model.multi_grid=(1, 0, 4) must hold a positive rate for each of layer4's 3 blocks",
    ),
    ("model.dtype", "float16", "model.dtype='float16' must be float32 or bfloat16"),
    ("model.dropout", 1.0, "model.dropout=1.0 must be in [0, 1)"),
    ("model.dropout", -0.1, "model.dropout=-0.1 must be in [0, 1)"),
    ("optim.name", "lamb", "optim.name='lamb' must be sgd or adamw"),
    ("optim.learning_rate", 0.0, "optim.learning_rate=0.0 must be positive"),
    ("optim.learning_rate", -0.1, "optim.learning_rate=-0.1 must be positive"),
    ("optim.schedule", "step", "optim.schedule='step' is unknown"),
    ("optim.weight_decay", -0.0001, "optim.weight_decay=-0.0001 must not be negative"),
    ("optim.momentum", 1.0, "optim.momentum=1.0 must be in [0, 1)"),
    ("optim.momentum", -0.5, "optim.momentum=-0.5 must be in [0, 1)"),
    ("optim.poly_power", 0.0, "optim.poly_power=0.0 must be positive"),
    ("optim.head_lr_multiplier", 0.0, "optim.head_lr_multiplier=0.0 must be positive"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 must not be negative"),
    (
        "distributed.coordinator_address",
        "localhost",
        "distributed.coordinator_address='localhost' must be HOST:PORT (process 0's), PORT in "
        "1-65535",
    ),
    (
        "distributed.initialization_timeout",
        0,
        "distributed.initialization_timeout=0 must be positive",
    ),
    (
        "distributed.num_processes",
        -1,
        "distributed.num_processes=-1 must not be negative (0: detected)",
    ),
    ("distributed.process_id", -2, "distributed.process_id=-2 must be -1 (detected) or more"),
    (  # with distributed.enabled and num_processes=2 (RELATED)
        "distributed.process_id",
        2,
        "distributed.process_id=2 must be below distributed.num_processes=2",
    ),
    ("seed", -1, "seed=-1 must be in [0, 2**32)"),
    ("seed", 2**32 + 5, "seed=4294967301 must be in [0, 2**32)"),
    ("seed", 2**32, "seed=4294967296 must be in [0, 2**32)"),
    ("loss.dice_weight", -0.5, "loss.dice_weight=-0.5 must not be negative"),
    ("train.batch_size", 1, "train.batch_size=1 must be at least 2 (BatchNorm over the batch)"),
    ("train.batch_size", 0, "train.batch_size=0 must be at least 2 (BatchNorm over the batch)"),
    ("train.num_steps", -5, "train.num_steps=-5 must not be negative"),
    ("train.num_epochs", 0, "train.num_epochs=0 must be positive"),
    ("train.log_every_steps", 0, "train.log_every_steps=0 must be positive"),
    ("train.eval_every_steps", -1, "train.eval_every_steps=-1 must not be negative"),
    (
        "train.checkpoint_every_steps",
        -10,
        "train.checkpoint_every_steps=-10 must not be negative",
    ),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be positive"),
    ("train.ema_decay", 1.0, "train.ema_decay=1.0 must be in [0, 1)"),
    ("eval.split", "validation", "eval.split='validation' is not one of ('train', 'val', 'test')"),
    ("eval.image_size", 0, "eval.image_size=0 must be positive"),
    ("eval.batch_size", 0, "eval.batch_size=0 must be positive"),
    ("eval.max_images", -8, "eval.max_images=-8 must not be negative (0: all)"),
    ("eval.threshold", 1.0, "eval.threshold=1.0 must be in (0, 1), or -1 for the tuned one"),
    ("eval.threshold", 0.0, "eval.threshold=0.0 must be in (0, 1), or -1 for the tuned one"),
    ("eval.threshold", -0.5, "eval.threshold=-0.5 must be in (0, 1), or -1 for the tuned one"),
    ("eval.tta", "vflip", "eval.tta='vflip' is not one of ('none', 'flip')"),
    ("eval.tta_sizes", (96, -1), "eval.tta_sizes=(96, -1) must be positive"),
    ("eval.preview_images", -1, "eval.preview_images=-1 must not be negative"),
    (
        "predict.threshold",
        0.0,
        "predict.threshold=0.0 must be in (0, 1), or -1 for the tuned one",
    ),
    ("predict.tta", "rot", "predict.tta='rot' is not one of ('none', 'flip')"),
    ("predict.image_size", -1, "predict.image_size=-1 must not be negative"),
    ("predict.batch_size", 0, "predict.batch_size=0 must be positive"),
    ("predict.save_prob", "jpg", "predict.save_prob='jpg' is not one of ('', 'png', 'npy')"),
    # predict.input and predict.output are only needed in predict mode.
    ("mode", "predict", "predict.input='' must name an image, a folder or a glob pattern"),
    ("mode", "predict", "predict.output='' must name the output folder"),
    (
        "augment.scale",
        (0.5, 0.2),
        "augment.scale=(0.5, 0.2) must be (low, high) with 0 < low <= high <= 1",
    ),
    (
        "augment.scale",
        (0.5, 1.5),
        "augment.scale=(0.5, 1.5) must be (low, high) with 0 < low <= high <= 1",
    ),
    ("augment.scale", (0.5,), "augment.scale=(0.5,) must be (low, high) with 0 < low <= high <= 1"),
    (
        "augment.scale",
        (0.0, 1.0),
        "augment.scale=(0.0, 1.0) must be (low, high) with 0 < low <= high <= 1",
    ),
    (
        "augment.ratio",
        (0.0, 1.0),
        "augment.ratio=(0.0, 1.0) must be (low, high) with 0 < low <= high",
    ),
    (
        "augment.ratio",
        (1.5, 0.75),
        "augment.ratio=(1.5, 0.75) must be (low, high) with 0 < low <= high",
    ),
    ("augment.rotation", -1.0, "augment.rotation=-1.0 must not be negative"),
    ("augment.brightness", -0.1, "augment.brightness=-0.1 must not be negative"),
    ("augment.contrast", -0.2, "augment.contrast=-0.2 must be in [0, 1]"),
    ("augment.contrast", 1.5, "augment.contrast=1.5 must be in [0, 1]"),
    ("augment.saturation", -0.3, "augment.saturation=-0.3 must be in [0, 1]"),
    ("augment.saturation", 1.01, "augment.saturation=1.01 must be in [0, 1]"),
    ("augment.hue", 0.6, "augment.hue=0.6 must be in [0, 0.5]"),
    ("augment.hue", -0.01, "augment.hue=-0.01 must be in [0, 0.5]"),
    ("augment.device_max_side", 0, "augment.device_max_side=0 must be positive"),
    ("model.aspp_channels", 0, "model.aspp_channels=0 must be positive"),
    (
        "eval.tta_sizes",
        (96, 227),
        "eval.tta_sizes=(96, 227) must not repeat a size or eval.image_size (each size would "
        "count twice)",
    ),
    (
        "eval.tta_sizes",
        (96, 96),
        "eval.tta_sizes=(96, 96) must not repeat a size or eval.image_size (each size would "
        "count twice)",
    ),
    ("model.decoder_channels", -8, "model.decoder_channels=-8 must be positive"),
    *(  # with distributed.enabled (RELATED)
        (
            "distributed.coordinator_address",
            address,
            f"distributed.coordinator_address={address!r} must be HOST:PORT (process 0's), "
            "PORT in 1-65535",
        )
        # A port over 65535 ended in a traceback; port 0 hung, the others unable to know it.
        for address in ("localhost:", "localhost:99999", "localhost:0")
    ),
    *(
        (
            f"distributed.{setting}",
            value,
            f"distributed.{setting}={value!r} is set, but distributed.enabled is False: enable "
            "it to join the other processes",
        )
        for setting, value in (
            ("coordinator_address", "10.0.0.1:1234"),
            ("num_processes", 2),
            ("process_id", 0),
        )
    ),
    # These start from configs/synthetic.py.
    ("data.synthetic_size", 0, "data.synthetic_size=0 must be positive"),
    ("data.synthetic_counts.train", 0, "data.synthetic_counts.train=0 must be positive"),
    ("data.synthetic_counts.val", -1, "data.synthetic_counts.val=-1 must be positive"),
    ("data.synthetic_counts.test", None, "data.synthetic_counts.test=None must be positive"),
]


# The other settings a rule needs before it applies.
RELATED = {
    ("distributed.process_id", 2): {"distributed.enabled": True, "distributed.num_processes": 2},
    **{
        ("distributed.coordinator_address", address): {"distributed.enabled": True}
        for address in ("localhost:", "localhost:99999", "localhost:0")
    },
}


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", 2**32 - 1),
        ("augment.hue", 0.5),
        ("augment.contrast", 1.0),
        ("augment.saturation", 1.0),
        *((f"augment.{name}", 0.0) for name in ("rotation", "brightness", "contrast")),
        *((f"augment.{name}", 0.0) for name in ("saturation", "hue")),  # 0: off
        ("model.dropout", 0.0),
        ("optim.momentum", 0.0),
        ("optim.weight_decay", 0.0),
        ("eval.preview_images", 0),
        ("train.batch_size", 2),
        ("augment.scale", (1.0, 1.0)),
        ("eval.threshold", 0.99),
        ("predict.threshold", -1.0),
        ("distributed.coordinator_address", "[::1]:1234"),
    ],
)
def test_values_at_the_edge_of_a_rule_pass(field, value):
    config = figaro.get_config()
    config.distributed.enabled = True
    config.update_from_flattened_dict({field: value})
    assert problems(config) == []


@pytest.mark.parametrize("field, value, message", BAD_VALUES)
def test_each_bad_value_is_named(field, value, message):
    config = (synthetic if field.startswith("data.synthetic") else figaro).get_config()
    config.update_from_flattened_dict(RELATED.get((field, value), {}))
    *sections, name = field.split(".")
    parent = config
    for section in sections:
        parent = parent[section]
    if value is None:
        del parent[name]
    else:
        parent[name] = value
    assert message in problems(config)
    with pytest.raises(ConfigError, match="Bad config") as error:
        check_config(config)
    assert message in str(error.value)


def rules() -> list[tuple[str, str]]:
    """(field, rule text) of every ``need(ok, field, rule)`` in ``problems``, read from the
    source: a field made in a loop (``f"augment.{name}"``) gives one per loop value, a rule
    with a value in it (``f"is not one of {MODES}"``) its fixed text."""
    source = inspect.getsource(config_checks.problems)
    tree = ast.parse(textwrap.dedent(source))
    named = {  # rule texts held in a variable (threshold_rule)
        node.targets[0].id: node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    loops = {  # loop variable -> the constant values it takes
        node.target.id: [element.value for element in node.iter.elts]
        for node in ast.walk(tree)
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple)
    }

    def texts(node: ast.expr) -> list[str]:
        if isinstance(node, ast.Constant):
            return [node.value]
        if isinstance(node, ast.Name):
            return [named[node.id]]
        assert isinstance(node, ast.JoinedStr), ast.dump(node)
        loop = [v.value.id for v in node.values if isinstance(v, ast.FormattedValue)]
        pattern = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        if len(loop) == 1 and loop[0] in loops:
            return [pattern.format(value) for value in loops[loop[0]]]
        return [pattern.split("{}")[0].strip()]  # the text before the first value

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "need":
            assert len(node.args) == 3, ast.dump(node)
            for field in texts(node.args[1]):
                found += [(field, rule) for rule in texts(node.args[2])]
    return found


def test_every_rule_has_a_bad_value_case():
    """A new rule in problems() fails here until BAD_VALUES gets a case for it."""
    found = rules()
    assert len(found) >= 55  # the parse found the rules (57 when written)
    assert ("augment.hue", "must be in [0, 0.5]") in found
    assert ("data.max_val_images", "must not be negative (0: all)") in found
    assert ("eval.split", "is not one of") in found
    messages = [message for _, _, message in BAD_VALUES]
    untested = [
        f"{field} {rule}"
        for field, rule in found
        if not any(m.startswith(f"{field}=") and f" {rule}" in m for m in messages)
    ]
    assert not untested, f"rules of problems() with no case in BAD_VALUES: {untested}"


@pytest.mark.parametrize(
    "field, value",
    [
        ("augment.rotation", float("inf")),  # a TensorFlow traceback in the pipeline
        ("augment.brightness", float("inf")),  # trained, without a word
        ("optim.learning_rate", float("inf")),
        ("augment.scale", (0.5, float("inf"))),
    ],
)
def test_infinite_values_are_named(field, value):
    """Infinity passes the rules' comparisons (``x > 0``); NaN fails them."""
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = value
    assert f"{field}={value!r} must be finite" in problems(config)


@pytest.mark.parametrize("field", ["optim.learning_rate", "eval.threshold", "data.data_dir"])
def test_a_field_set_to_none_is_named_alone(field):
    """A config file may set a field to None (ml_collections allows it); the rules below would
    compare it as a number and fail with a TypeError."""
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = None
    assert problems(config) == [f"{field}=None must be set to a value (no field takes None)"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("input.mean", ("abc",)),
        ("eval.tta_sizes", (192, "abc")),
        ("augment.scale", (0.5, "abc")),
        ("model.multi_grid", (1, 2, True)),
    ],
)
def test_tuples_of_anything_but_numbers_are_named_alone(field, value):
    """Checked first: the other rules would compare them as numbers and fail."""
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = value
    assert problems(config) == [f"{field}={value!r} must hold numbers"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("data.progressive_sizes", (96.5,)),
        ("eval.tta_sizes", (128.5,)),
        ("model.multi_grid", (1.5, 2, 4)),
    ],
)
def test_sizes_and_rates_must_be_whole_numbers(field, value):
    config = figaro.get_config()
    section, name = field.split(".")
    config[section][name] = value
    assert problems(config) == [f"{field}={value!r} must hold whole numbers"]


def test_one_mean_and_std_stand_for_all_three_channels():
    """As README gives them for the original project's checkpoints (mean 98, std 80)."""
    config = figaro.get_config()
    config.input.mean, config.input.std = (98,), (80,)
    assert problems(config) == []


@pytest.mark.parametrize("until", [(0.7, 0.4), (0.5, 1.0), (0.0, 0.5), (0.5,)])
def test_progressive_stages_need_increasing_fractions_inside_training(until):
    config = figaro.get_config()
    config.data.progressive_sizes = (64, 96)
    config.data.progressive_until = until
    assert any("data.progressive_until" in problem for problem in problems(config))
    config.data.progressive_until = (0.3, 0.6)
    assert problems(config) == []


def test_epochs_may_be_zero_when_steps_are_given():
    config = figaro.get_config()
    config.train.num_epochs = 0
    config.train.num_steps = 10
    assert problems(config) == []


def test_all_problems_are_reported_together():
    config = figaro.get_config()
    config.optim.learning_rate = -1.0
    config.train.batch_size = -2
    assert len(problems(config)) == 2


def test_config_changes_name_the_fields_that_matter_old_to_new():
    saved = json.loads(figaro.get_config("smoke").to_json_best_effort())
    config = figaro.get_config("smoke")
    assert config_changes(saved, config) == []
    config.model.backbone = "resnet34"
    config.train.batch_size = 8
    config.augment.scale = (0.5, 1.0)
    # Fields that may change on resume: mode, eval.*, logging and checkpoint frequency, ...
    config.mode = "eval"
    config.eval.batch_size = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 3
    config.data.data_dir = "/elsewhere/Figaro1k"
    config.data.max_val_images = 2
    config.train.allow_config_change = True
    assert config_changes(saved, config) == [
        "augment.scale: [0.25, 1.0] -> [0.5, 1.0]",
        "model.backbone: 'resnet18' -> 'resnet34'",
        "train.batch_size: 4 -> 8",
    ]
    # Fields only one side has (another version of the code) are not compared.
    del saved["model"]["dropout"]
    saved["train"]["retired_field"] = 1
    config.model.dropout = 0.1
    assert len(config_changes(saved, config)) == 3


def test_predict_mode_needs_an_input_and_an_output_folder():
    config = figaro.get_config()
    assert problems(config) == []  # not asked for outside predict mode
    config.mode = "predict"
    assert problems(config) == [
        "predict.input='' must name an image, a folder or a glob pattern",
        "predict.output='' must name the output folder",
    ]
    config.predict.input, config.predict.output = "photos/*.jpg", "masks"
    assert problems(config) == []


def test_an_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="known: smoke, scratch"):
        figaro.get_config("fast")


def test_a_config_lacking_a_field_names_it():
    config = figaro.get_config()
    del config.augment["hue"]
    with pytest.raises(ConfigError, match="^Bad config: it has no field 'hue'. A config file"):
        check_config(config)


def test_folder_flags_expand_the_home_and_refuse_an_empty_value(monkeypatch, tmp_path):
    """A shell leaves ``--workdir=~/x`` as it is; an empty one would mean the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_checks.folder_flag("~/runs/x", "--workdir") == tmp_path / "runs" / "x"
    assert config_checks.folder_flag("runs/x", "--workdir") == Path("runs/x")
    for empty in ("", " ", None):
        with pytest.raises(ConfigError, match="^--out is empty: it must name a folder.$"):
            config_checks.folder_flag(empty, "--out")


def test_path_fields_get_the_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = figaro.get_config()
    config.data.data_dir, config.model.pretrained = "~/Figaro1k", "~/w/resnet101.pth"
    config.predict.output, config.data.split_file = "~/masks", "train_val_test.json"
    config.predict.input, config.compilation_cache = "~/photos/*.jpg", "~/.cache/jax"
    config_checks.expand_user(config)
    assert config.data.data_dir == str(tmp_path / "Figaro1k")
    assert config.model.pretrained == str(tmp_path / "w" / "resnet101.pth")
    assert config.predict.output == str(tmp_path / "masks")
    assert config.predict.input == str(tmp_path / "photos" / "*.jpg")
    assert config.compilation_cache == str(tmp_path / ".cache" / "jax")
    assert config.data.split_file == "train_val_test.json"  # relative to data_dir, as it was
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    assert set(config_checks.PATH_FIELDS) <= flat.keys()  # each a field of the shipped configs


def test_a_folder_that_cannot_be_made_is_named_before_it_is_made(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as error:
        config_checks.check_folder(tmp_path / "file" / "w", "--workdir")
    message = f"--workdir='{tmp_path / 'file' / 'w'}' cannot be made a folder ("
    assert str(error.value) == message + f"{tmp_path / 'file'} is a file)."
    config_checks.check_folder(tmp_path / "new" / "w", "--workdir")  # can be made
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as error:
        config_checks.check_folder(tmp_path / "new" / "w", "--workdir")
    message = f"--workdir='{tmp_path / 'new' / 'w'}' cannot be made a folder ("
    assert str(error.value) == message + f"{tmp_path} cannot be written to)."
    with pytest.raises(ConfigError, match="is a folder this user cannot write to"):
        config_checks.check_folder(tmp_path, "--workdir")


def test_a_folder_that_cannot_be_written_is_named(monkeypatch, tmp_path):
    """E.g. a read-only mount: found before the work, not at the first file written. Making a
    file in a folder takes both its write and its search (x) permission."""
    assert config_checks.make_folder(tmp_path / "w", "--workdir") == tmp_path / "w"
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(ConfigError, match="is a folder this user cannot write to"):
        config_checks.check_folder(tmp_path / "w", "--workdir")
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: True)
    config_checks.check_folder(Path("/hairseg-missing-top/w"), "--workdir")  # / can take it
    monkeypatch.setattr(config_checks.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as error:
        config_checks.make_folder(tmp_path / "w", "--workdir")
    message = f"--workdir='{tmp_path / 'w'}' is a folder this user cannot write to."
    assert str(error.value) == message
