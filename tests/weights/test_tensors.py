"""Reading state dicts: unwrapping, prefixes, dtypes, one-line errors; StateDict; check_matches."""

import sys

import jax
import numpy as np
import pytest

from hairseg_jax.weights.tensors import (
    ConversionError,
    StateDict,
    check_matches,
    hwio,
    load_state_dict,
)


@pytest.fixture(scope="module")
def original_file(torch, tmp_path_factory):
    """A small model saved like the original project: DataParallel keys, optimizer, NumPy
    best_pred."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("original") / "checkpoint.pth.tar"
    checkpoint = {
        "epoch": 3,
        "state_dict": torch.nn.DataParallel(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_pred": np.float64(0.81),
    }
    torch.save(checkpoint, path)
    return path


def test_load_unwraps_the_originals_checkpoint(original_file):
    state = load_state_dict(original_file)
    assert sorted(state) == [
        "0.bias",
        "0.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.weight",
    ]
    assert state["0.weight"].shape == (4, 3, 3, 3)
    assert all(v.dtype == np.float32 for v in state.values())


def test_load_converts_half_precision_to_float32(torch, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({"model": {"w": torch.ones(2, dtype=torch.float16)}}, path)
    assert load_state_dict(path)["w"].dtype == np.float32


def one_line_error(path) -> str:
    with pytest.raises(ConversionError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unreadable_files_give_one_line(torch, original_file, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(original_file.read_bytes()[:1000])
    assert "truncated or corrupt" in one_line_error(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert "not a PyTorch checkpoint" in one_line_error(text)
    assert "not found" in one_line_error(tmp_path / "missing.pth")
    no_tensors = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, no_tensors)
    assert "holds no tensors" in one_line_error(no_tensors)
    pickled_module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    assert "save the state dict alone (model.state_dict())" in one_line_error(pickled_module)
    # A type torch would not build (not a global it would not look up): named, not "corrupt".
    other_type = tmp_path / "complex.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "z": np.complex64(1)}, other_type)
    assert "pickles a numpy.dtypes.Complex64DType, not only tensors" in one_line_error(other_type)


def test_numpy_scalars_beside_the_tensors_load(torch, tmp_path):
    """An epoch as np.int64, a flag as np.bool_, a score as np.float16 or np.float32."""
    path = tmp_path / "scalars.pth"
    scalars = {"epoch": np.int64(3), "step": np.int32(7), "best": np.float32(0.5)}
    scalars |= {"half": np.float16(1), "done": np.bool_(True), "best_pred": np.float64(0.9)}
    torch.save({"state_dict": {"w": torch.ones(2)}, **scalars}, path)
    np.testing.assert_array_equal(load_state_dict(path)["w"], [1.0, 1.0])


def test_state_dict_takes_converts_and_reports_leftovers():
    state = StateDict(
        {
            "conv.weight": np.arange(24, dtype=np.float32).reshape(4, 3, 2, 1),
            "conv.bias": np.zeros(4, np.float32),
            "bn.weight": np.ones(4, np.float32),
            "bn.bias": np.zeros(4, np.float32),
            "bn.running_mean": np.zeros(4, np.float32),
            "bn.running_var": np.ones(4, np.float32),
            "fc.weight": np.ones((2, 4), np.float32),
        },
        "file.pth",
    )
    conv = state.conv("conv")
    assert conv["kernel"].shape == (2, 1, 3, 4)
    assert conv["kernel"][1, 0, 2, 3] == state.tensors["conv.weight"][3, 2, 1, 0]
    params, stats = state.batch_norm("bn")
    assert set(params) == {"scale", "bias"} and set(stats) == {"mean", "var"}
    assert state.unused() == ["fc.weight"]
    state.check_all_used(ignore_prefixes=("fc.",))
    with pytest.raises(ConversionError, match="1 tensors the model does not use: fc.weight"):
        state.check_all_used()
    with pytest.raises(ConversionError, match="no tensor 'bn.runing_var'; close keys: bn.running"):
        state.take("bn.runing_var")


def test_hwio_moves_torch_axes():
    assert hwio(np.zeros((8, 3, 7, 5))).shape == (7, 5, 3, 8)


def test_check_matches_names_missing_extra_and_misshaped_leaves():
    template = {"params": {"a": jax.ShapeDtypeStruct((3, 3), np.float32), "b": np.zeros(2)}}
    check_matches({"params": {"a": np.zeros((3, 3)), "b": np.ones(2)}}, template)
    with pytest.raises(ConversionError) as info:
        check_matches({"params": {"a": np.zeros((3, 4)), "c": np.ones(2)}}, template, "file")
    message = str(info.value)
    assert message.startswith("The file does not fit the model")
    assert "1 missing: params/b" in message
    assert "1 unexpected: params/c" in message
    assert "params/a (3, 4) vs (3, 3)" in message


def test_missing_torch_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(ConversionError, match=r"needs PyTorch: pip install -e '\.\[torch\]'"):
        load_state_dict(tmp_path / "resnet18.pth")


def test_batch_norm_takes_running_mean_as_mean_and_running_var_as_var():
    state = StateDict(
        {
            "bn.weight": np.array([1.0]),
            "bn.bias": np.array([2.0]),
            "bn.running_mean": np.array([3.0]),
            "bn.running_var": np.array([4.0]),
        }
    )
    params, stats = state.batch_norm("bn")
    assert (params["scale"][0], params["bias"][0]) == (1.0, 2.0)
    assert (stats["mean"][0], stats["var"][0]) == (3.0, 4.0)
    assert state.unused() == []


def test_numpy_dtype_classes_pickled_by_name_load(torch, tmp_path):
    """A dtype class pickled by reference (GLOBAL numpy.dtypes.Int64DType) is looked up by
    the name given to torch's allowlist."""
    path = tmp_path / "classes.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "kind": np.dtypes.Int64DType}, path)
    np.testing.assert_array_equal(load_state_dict(path)["w"], [1.0, 1.0])
