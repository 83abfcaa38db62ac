"""Loading pretrained weights as a user would: files, the CLI, torchvision names, the
original project's checkpoints with its preprocessing, and the errors of wrong files."""

import functools
import logging
import subprocess
import sys
import urllib.error

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from hairseg_jax import config_checks, models, sharding, steps, train
from hairseg_jax.weights import convert
from hairseg_jax.weights.tensors import ConversionError, load_state_dict
from tests.conftest import REPO, run_python, run_without_backend
from tests.test_train import tiny_config


def save_resnet(torch, reference, name: str, path, seed: int = 0) -> None:
    """Saves a random ResNet in torchvision's format (with an ``fc``)."""
    torch.manual_seed(seed)
    model = reference.torch_resnet(name, num_classes=10)
    reference.randomize_batch_norm_stats(model, torch.Generator().manual_seed(seed))
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def resnet18_file(torch, reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.pth"
    save_resnet(torch, reference, "resnet18", path)
    return path


def init_shapes(model: models.DeepLabV3Plus) -> dict:
    """Shapes of ``model``'s variables."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return dict(
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    )


@functools.cache
def fresh_variables(backbone: str) -> dict:
    """Shapes of the variables of ``DeepLabV3Plus(backbone)``, the template of a load."""
    return init_shapes(models.DeepLabV3Plus(backbone=backbone))


def zero_state(model: models.DeepLabV3Plus, ema: bool = False) -> steps.TrainState:
    """A train state of ``model`` with zero variables (a jitted init takes ~10 s to compile)."""
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init_shapes(model))
    return steps.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1),
        batch_stats=variables["batch_stats"],
        rng=jax.random.key(0),
        ema_params=variables["params"] if ema else None,
    )


def no_data(*args):
    raise AssertionError("the data are read after the check")


def model_config(backbone: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"backbone": backbone, **fields})


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    return run_python("-m", "hairseg_jax.weights.convert", *args, env=env, timeout=300)


def test_cli_converts_a_torchvision_file(resnet18_file, tmp_path):
    out = tmp_path / "resnet18.msgpack"
    # JAX_PLATFORMS unset, as a user runs it: JAX tries a TPU, whose INFO line is dropped.
    result = run_cli(
        f"--torch={resnet18_file}",
        f"--out={out}",
        "--backbone=resnet18",
        env={"JAX_PLATFORMS": None},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Converted 100 tensors (resnet18 backbone)" in result.stdout
    assert "libtpu" not in result.stderr
    saved = convert.load_variables(out)
    expected, _ = convert.convert_file(resnet18_file, "resnet18")
    jax.tree.map(np.testing.assert_array_equal, saved, expected)


def test_cli_refuses_an_out_file_that_pretrained_would_not_read_as_msgpack(tmp_path):
    """config.model.pretrained picks its reader by the suffix: a .pth name would mislead it."""
    out = tmp_path / "resnet18.pth"
    result = run_cli(f"--torch={tmp_path / 'any.pth'}", f"--out={out}", "--backbone=resnet18")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"FATAL --out={out} must end in .msgpack."
    assert not out.exists()


def test_cli_names_a_backend_that_cannot_start(resnet18_file, tmp_path):
    """As main.py does; it was JAX's bare AssertionError and 40 lines of traceback."""
    out = tmp_path / "resnet18.msgpack"
    run_without_backend(
        "-m", "hairseg_jax.weights.convert", f"--torch={resnet18_file}", f"--out={out}"
    )


def test_cli_refuses_a_resnet50_file_for_resnet101(torch, reference, tmp_path):
    path = tmp_path / "resnet50.pth"
    save_resnet(torch, reference, "resnet50", path)
    result = run_cli(f"--torch={path}", f"--out={tmp_path / 'out.msgpack'}")  # resnet101
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"FATAL {path} holds a resnet50 ResNet (16 bottleneck blocks (3, 4, 6, 3)), but "
        "backbone resnet101 expects 33 bottleneck blocks (3, 4, 23, 3)"
    )
    assert not (tmp_path / "out.msgpack").exists()


def bad_file(kind: str, resnet18_file, tmp_path):
    path = tmp_path / "resnet18.pth"
    if kind == "truncated":
        data = resnet18_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text file":
        path.write_text("resnet18 weights\n")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "is truncated or corrupt"),
        ("text file", "is not a PyTorch checkpoint"),
        ("missing", "Pretrained weights not found"),
    ],
)
def test_bad_files_give_one_clear_error(torch, resnet18_file, tmp_path, kind, message):
    path = bad_file(kind, resnet18_file, tmp_path)
    with pytest.raises(ConversionError) as info:
        convert.load_pretrained(str(path), fresh_variables("resnet18"), model_config("resnet18"))
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key",
    # A block's conv1 was read as the end of its layer: "holds an unknown ResNet (7 ...)".
    ["layer3.1.bn2.running_var", "layer1.0.conv1.weight", "layer4.1.conv1.weight"],
)
def test_missing_tensor_is_named(resnet18_file, key):
    state = load_state_dict(resnet18_file)
    del state[key]
    with pytest.raises(ConversionError, match=f"^state dict has no tensor '{key}'"):
        convert.convert_backbone(state, "resnet18")


def test_a_resnet_of_no_known_depth_is_named(resnet18_file):
    state = load_state_dict(resnet18_file)
    state = {key: value for key, value in state.items() if not key.startswith("layer4.1.")}
    with pytest.raises(ConversionError, match=r"holds an unknown ResNet \(7 basic blocks"):
        convert.convert_backbone(state, "resnet18")


def test_a_file_of_the_other_family_is_named(resnet18_file):
    """A ResNet file for mobilenet_v2 was "has no tensor 'features.0.0.weight'"."""
    resnet18 = load_state_dict(resnet18_file)
    with pytest.raises(ConversionError) as info:
        convert.convert_backbone(resnet18, "mobilenet_v2")
    assert str(info.value) == (
        "state dict holds a resnet18 ResNet (8 basic blocks (2, 2, 2, 2)), but backbone "
        "mobilenet_v2 expects a mobilenet_v2 (features.*)"
    )
    mobilenet = {"features.0.0.weight": np.zeros((32, 3, 3, 3), np.float32)}
    with pytest.raises(ConversionError, match="^state dict holds a mobilenet_v2, but backbone"):
        convert.convert_backbone(mobilenet, "resnet18")


def test_a_kernel_that_is_not_4_d_is_named(resnet18_file):
    state = load_state_dict(resnet18_file)
    state["conv1.weight"] = state["conv1.weight"][..., 0]  # was a NumPy transpose's ValueError
    with pytest.raises(ConversionError, match=r"conv1.weight has shape \(64, 3, 7\), not a conv"):
        convert.convert_backbone(state, "resnet18")


def test_unknown_spec_is_refused():
    with pytest.raises(ConversionError, match="Unknown pretrained weights 'weights.h5'"):
        convert.load_pretrained("weights.h5", {}, model_config("resnet18"))


def test_empty_spec_keeps_the_variables():
    variables = {"params": {}, "batch_stats": {}}
    assert convert.load_pretrained("", variables, model_config("resnet18")) is variables


def test_torchvision_name_without_network_says_where_to_place_the_file(
    torch, resnet18_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url, dst, hash_prefix, *args, **kwargs):
        assert hash_prefix == "f37072fd"  # torch checks the download's sha256 against it
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    config = model_config("resnet18")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConversionError) as info:
        convert.load_pretrained("torchvision:resnet18", fresh_variables("resnet18"), config)
    assert str(info.value) == (
        "could not download https://download.pytorch.org/models/resnet18-f37072fd.pth "
        f"(<urlopen error no network>); place the file at {expected} or set "
        "config.model.pretrained to a local path"
    )
    # Training stops there before reading the data or making a folder.
    training = tiny_config()
    training.model.pretrained = "torchvision:resnet18"
    monkeypatch.setattr(train.sources, "load_examples", no_data)
    with pytest.raises(ConversionError, match="^could not download https://download.pytorch"):
        train.train_and_evaluate(training, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # Placed there, the file is used without a download.
    expected.write_bytes(resnet18_file.read_bytes())
    variables = convert.load_pretrained("torchvision:resnet18", fresh_variables("resnet18"), config)
    want, _ = convert.convert_file(resnet18_file, "resnet18")
    jax.tree.map(np.testing.assert_array_equal, variables["params"]["backbone"], want["params"])
    with pytest.raises(ConversionError, match="does not fit config.model.backbone='resnet50'"):
        convert.load_pretrained("torchvision:resnet18", {}, model_config("resnet50"))


def test_msgpack_round_trip_and_bad_msgpack(resnet18_file, tmp_path):
    variables, _ = convert.convert_file(resnet18_file, "resnet18")
    path = tmp_path / "sub" / "resnet18.msgpack"
    convert.save_variables(variables, path)
    assert [p.name for p in path.parent.iterdir()] == ["resnet18.msgpack"]  # no temp file left
    jax.tree.map(np.testing.assert_array_equal, convert.load_variables(path), variables)
    for other in ("resnet50", "mobilenet_v2"):  # were 100+ missing and unexpected tensors
        with pytest.raises(ConversionError) as info:
            convert.load_pretrained(str(path), fresh_variables(other), model_config(other))
        assert str(info.value) == (
            f"{path} holds a resnet18 backbone, but config.model.backbone is {other!r}"
        )
    bad = tmp_path / "bad.msgpack"
    bad.write_text("hello")
    with pytest.raises(ConversionError, match="is not a converted .msgpack file"):
        convert.load_variables(bad)


def parse_figaro_config(monkeypatch, *overrides: str) -> ml_collections.ConfigDict:
    """configs/figaro.py with command-line overrides, parsed as main.py parses them."""
    argv = ["main.py", f"--config={REPO / 'configs' / 'figaro.py'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
    flag_values(argv)
    return flag_values.config


def test_original_checkpoint_with_its_preprocessing(
    torch, reference, tmp_path, monkeypatch, caplog
):
    """An original project checkpoint (DataParallel, two classes, align_corners=True) fed
    BGR images normalised by 98 / 80 predicts exactly its argmax, through the trainer's path."""
    torch.manual_seed(0)
    model = reference.torch_deeplab("resnet18", 16, num_classes=2, align_corners=True)
    reference.randomize_batch_norm_stats(model, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 50,
            "state_dict": torch.nn.DataParallel(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_pred": np.float64(0.9),
        },
        path,
    )
    config = parse_figaro_config(
        monkeypatch,
        "--config.model.backbone=resnet18",
        "--config.model.align_corners=True",
        f"--config.model.pretrained={path}",
        "--config.input.channel_order=BGR",
        "--config.input.mean=98",
        "--config.input.std=80",
    )
    assert tuple(config.input.mean) == (98,) and tuple(config.input.std) == (80,)
    config_checks.check_config(config)  # README's command for these files passes the checks
    state = zero_state(models.build_model(config.model))
    with caplog.at_level(logging.WARNING):
        state = train.load_pretrained(state, config)
    assert "trained with other settings" not in caplog.text
    _, predict_step = steps.jit_steps(config)
    images = np.random.default_rng(0).integers(0, 256, (2, 131, 97, 3), dtype=np.uint8)
    logits = np.asarray(predict_step(state, images))[..., 0]

    bgr = torch.from_numpy(images[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        two_class = model.eval()((bgr - 98) / 80).numpy()
    error = np.abs(logits - (two_class[:, 1] - two_class[:, 0])).max()
    print(f"original checkpoint, resnet18 OS16 131x97 logits: max abs error {error:.2e}")
    assert error <= 1e-4
    np.testing.assert_array_equal(logits > 0, two_class.argmax(axis=1) == 1)

    # Converted once to .msgpack (the CLI's output), it loads to the same variables.
    converted = tmp_path / "original.msgpack"
    convert.save_variables(convert.convert_file(path, "resnet18")[0], converted)
    again = convert.load_pretrained(str(converted), fresh_variables("resnet18"), config.model)
    loaded = {"params": state.params, "batch_stats": state.batch_stats}
    jax.tree.map(np.testing.assert_array_equal, again, loaded)
    with pytest.raises(ConversionError, match=r"holds a resnet18 DeepLabV3\+, but config.model"):
        convert.load_pretrained(str(converted), {}, model_config("resnet34"))

    # Loaded with this project's own settings, it would predict from other inputs: named.
    mine = parse_figaro_config(monkeypatch, "--config.model.backbone=resnet18")
    with caplog.at_level(logging.WARNING):
        convert.load_pretrained(str(converted), fresh_variables("resnet18"), mine.model, mine.input)
    assert (
        f"{converted} is a whole model of the original project, trained with other settings: "
        "to reproduce its predictions, set --config.model.align_corners=True "
        "--config.input.channel_order=BGR --config.input.mean=98 --config.input.std=80."
    ) in caplog.text
    mine.input.mean = (98.0, 98.0, 98.0)  # the same as (98,)
    assert convert.unlike_the_original(mine.model, mine.input)[1:] == [
        "--config.input.channel_order=BGR",
        "--config.input.std=80",
    ]


def test_training_starts_from_a_converted_backbone(resnet18_file, tmp_path, caplog):
    converted = tmp_path / "resnet18.msgpack"
    convert.save_variables(convert.convert_file(resnet18_file, "resnet18")[0], converted)
    config = tiny_config()
    config.model.pretrained = str(converted)
    fresh = zero_state(models.build_model(config.model), ema=True)
    caplog.set_level(logging.INFO)
    state = train.load_pretrained(fresh, config)
    assert f"Loaded pretrained weights from {converted}." in caplog.text
    want = convert.load_variables(converted)
    same = functools.partial(jax.tree.map, np.testing.assert_array_equal)
    same(state.params["backbone"], want["params"])
    same(state.ema_params["backbone"], want["params"])
    same(state.batch_stats["backbone"], want["batch_stats"])
    same(state.params["aspp"], fresh.params["aspp"])
    # Placed as the jitted steps take it: replicated over every device.
    replicated = sharding.replicated(sharding.data_mesh())
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:resnet10", "Unknown torchvision model 'resnet10'; known: resnet18, "),
        ("torchvision:", "Unknown torchvision model ''; known: resnet18, "),
        ("torchvision:resnet50", "torchvision:resnet50 does not fit config.model.backbone="),
    ],
)
def test_a_torchvision_name_that_cannot_fit_stops_training_before_the_data(
    tmp_path, monkeypatch, spec, message
):
    config = tiny_config()
    config.model.pretrained = spec
    monkeypatch.setattr(train.sources, "load_examples", no_data)
    with pytest.raises(ConversionError, match=message):
        train.train_and_evaluate(config, tmp_path)


def test_training_loads_config_model_pretrained(resnet18_file, tmp_path):
    """train_and_evaluate reads the field: a file of another backbone stops it before step 1."""
    config = tiny_config()
    config.model.backbone = "resnet34"
    config.model.pretrained = str(resnet18_file)
    with pytest.raises(ConversionError, match="a resnet18 ResNet .* backbone resnet34 expects"):
        train.train_and_evaluate(config, tmp_path)
    assert not list(tmp_path.glob("checkpoints/*"))
