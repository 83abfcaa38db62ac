"""PyTorch checkpoints -> Flax variables: torchvision backbones and the original's DeepLabV3+.

    python -m hairseg_jax.weights.convert --torch=resnet101-63fe2227.pth --out=resnet101.msgpack

converts a torchvision ResNet (or MobileNetV2) state dict into the variables of the Flax
backbone, or an original project checkpoint (keys ``backbone.``, ``aspp.``, ``decoder.``, found
by itself) into those of the whole model. The trainer reads ``config.model.pretrained`` through
``load_pretrained``. torch is imported only while a ``.pth`` file is read or downloaded.
"""

import functools
import itertools
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hairseg_jax import cli, files, sharding, steps
from hairseg_jax.models.deeplab import DeepLabV3Plus
from hairseg_jax.models.resnet import BACKBONES
from hairseg_jax.weights.tensors import (
    ConversionError,
    StateDict,
    check_matches,
    load_state_dict,
)

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}

# The official torchvision (ImageNet1K_V1) weights that ``torchvision:<name>`` downloads.
TORCHVISION_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"

# Top-level modules of the original project's DeepLab (its checkpoints' keys start with them).
_ORIGINAL_MODULES = ("backbone.", "aspp.", "decoder.")
_TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt")
# The first tensor of a torchvision MobileNetV2 (a ResNet's is layer1.0.conv1.weight).
_MOBILENET_FIRST = "features.0.0.weight"


def _state(state_dict: Mapping[str, np.ndarray] | StateDict) -> StateDict:
    return state_dict if isinstance(state_dict, StateDict) else StateDict(state_dict)


def _resnet_layout(state: StateDict) -> tuple[tuple[int, ...], str]:
    """(blocks per layer, block kind) of the ResNet whose tensors ``state`` holds, from the
    names of its blocks' tensors (any of them: a missing one is named when it is taken)."""
    names = [key.split(".") for key in state.tensors if key.startswith("layer")]
    blocks = {(parts[0], parts[1]) for parts in names if len(parts) > 2}
    counts = tuple(
        next(j for j in itertools.count() if (f"layer{i}", str(j)) not in blocks)
        for i in range(1, 5)
    )
    bottleneck = any(
        parts[:3] in (["layer1", "0", "conv3"], ["layer1", "0", "bn3"]) for parts in names
    )
    return counts, "bottleneck" if bottleneck else "basic"


def _held(state: StateDict) -> str:
    """What backbone the torchvision tensors of ``state`` are, for an error."""
    found = _resnet_layout(state)
    if sum(found[0]):
        name = next((n for n, layout in BACKBONES.items() if layout == found), None)
        kind = f"a {name}" if name else "an unknown"
        return f"{kind} ResNet ({sum(found[0])} {found[1]} blocks {found[0]})"
    if _MOBILENET_FIRST in state:
        return "a mobilenet_v2"
    return f"no ResNet or MobileNetV2 (no layer1.0.conv1.weight, no {_MOBILENET_FIRST})"


def _held_by_variables(backbone_params: Mapping[str, Any]) -> str | None:
    """The backbone (a ``BACKBONES`` name or ``"mobilenet_v2"``) whose Flax parameters
    ``backbone_params`` are, or None if none."""
    if "features_0" in backbone_params:
        return "mobilenet_v2"
    counts = tuple(
        next(j for j in itertools.count() if f"layer{i}_{j}" not in backbone_params)
        for i in range(1, 5)
    )
    block = "bottleneck" if "conv3" in backbone_params.get("layer1_0", {}) else "basic"
    return next((n for n, layout in BACKBONES.items() if layout == (counts, block)), None)


def _resnet_tensors(state: StateDict, backbone: str) -> Variables:
    """Takes the tensors of the torchvision ResNet ``backbone`` from ``state``."""
    expected = BACKBONES[backbone]
    if _resnet_layout(state) != expected:
        raise ConversionError(
            f"{state.source} holds {_held(state)}, but backbone {backbone} expects "
            f"{sum(expected[0])} {expected[1]} blocks {expected[0]}"
        )
    stage_sizes, block = expected
    params: dict[str, Any] = {"conv1": state.conv("conv1")}
    stats: dict[str, Any] = {}
    params["bn1"], stats["bn1"] = state.batch_norm("bn1")
    for i, num_blocks in enumerate(stage_sizes, start=1):
        for j in range(num_blocks):
            prefix, name = f"layer{i}.{j}", f"layer{i}_{j}"
            block_params: dict[str, Any] = {}
            block_stats: dict[str, Any] = {}
            for k in range(1, 4 if block == "bottleneck" else 3):
                block_params[f"conv{k}"] = state.conv(f"{prefix}.conv{k}")
                block_params[f"bn{k}"], block_stats[f"bn{k}"] = state.batch_norm(f"{prefix}.bn{k}")
            if f"{prefix}.downsample.0.weight" in state:
                block_params["downsample_conv"] = state.conv(f"{prefix}.downsample.0")
                block_params["downsample_bn"], block_stats["downsample_bn"] = state.batch_norm(
                    f"{prefix}.downsample.1"
                )
            params[name], stats[name] = block_params, block_stats
    return {"params": params, "batch_stats": stats}


def _backbone_tensors(state: StateDict, backbone: str) -> Variables:
    """The Flax backbone's variables from a torchvision state dict; every tensor but the
    classifier's must be used."""
    if backbone.startswith("mobilenet"):
        from hairseg_jax.weights import mobilenet_v2_port

        if _MOBILENET_FIRST not in state:
            raise ConversionError(
                f"{state.source} holds {_held(state)}, but backbone {backbone} expects a "
                "mobilenet_v2 (features.*)"
            )
        variables = mobilenet_v2_port.convert_mobilenet_v2(state)
        state.check_all_used(mobilenet_v2_port.UNUSED_PREFIXES)
    elif backbone in BACKBONES:
        variables = _resnet_tensors(state, backbone)
        state.check_all_used(("fc.",))
    else:
        raise ConversionError(f"No converter for backbone {backbone!r}.")
    return variables


@functools.cache
def _model_template(backbone: str) -> Variables:
    """Shapes of a DeepLabV3+ model's variables with the original's head widths."""
    return steps.variable_shapes(DeepLabV3Plus(backbone=backbone), 64)


def _backbone_part(variables: Variables) -> Variables:
    return {kind: variables[kind]["backbone"] for kind in ("params", "batch_stats")}


def convert_backbone(state_dict: Mapping[str, np.ndarray] | StateDict, backbone: str) -> Variables:
    """``{"params", "batch_stats"}`` of the Flax backbone ``backbone`` (a ResNet name or
    ``"mobilenet_v2"``) from a torchvision state dict.

    Raises:
        ConversionError: a tensor is missing or left over, or a shape does not fit.
    """
    state = _state(state_dict)
    variables = _backbone_tensors(state, backbone)
    check_matches(variables, _backbone_part(_model_template(backbone)), f"{backbone} backbone")
    return variables


def _batch_norm_into(
    state: StateDict, prefix: str, params: dict[str, Any], stats: dict[str, Any], name: str
) -> None:
    params[name], stats[name] = state.batch_norm(prefix)


def convert_original_deeplab(
    state_dict: Mapping[str, np.ndarray] | StateDict,
    backbone: str = "resnet101",
    template: Variables | None = None,
) -> Variables:
    """Variables of the whole Flax DeepLabV3+ from an original project checkpoint.

    The original's two output channels (background, hair) become one logit, channel 1 minus
    channel 0, so that ``logit > 0`` is exactly its ``argmax == 1``.

    Args:
        state_dict: the original's model tensors (``module.`` already stripped).
        backbone: the original's backbone (it trained ResNet-101).
        template: the model's variables or their shapes; by default those of
            ``DeepLabV3Plus(backbone=backbone)``.

    Raises:
        ConversionError: a tensor is missing or left over, or a shape does not fit.
    """
    state = _state(state_dict)
    prefix = "backbone."
    backbone_state = StateDict(
        {k.removeprefix(prefix): v for k, v in state.tensors.items() if k.startswith(prefix)},
        f"{state.source} (backbone.*)",
    )
    backbone_vars = _backbone_tensors(backbone_state, backbone)
    head = StateDict(
        {k: v for k, v in state.tensors.items() if not k.startswith(prefix)}, state.source
    )
    aspp: dict[str, Any] = {}
    aspp_stats: dict[str, Any] = {}
    for i in range(1, 5):
        branch, branch_stats = {"atrous_conv": head.conv(f"aspp.aspp{i}.atrous_conv")}, {}
        _batch_norm_into(head, f"aspp.aspp{i}.bn", branch, branch_stats, "bn")
        aspp[f"aspp{i}"], aspp_stats[f"aspp{i}"] = branch, branch_stats
    aspp["global_avg_pool_conv"] = head.conv("aspp.global_avg_pool.1")
    _batch_norm_into(head, "aspp.global_avg_pool.2", aspp, aspp_stats, "global_avg_pool_bn")
    aspp["conv1"] = head.conv("aspp.conv1")
    _batch_norm_into(head, "aspp.bn1", aspp, aspp_stats, "bn1")

    decoder: dict[str, Any] = {"conv1": head.conv("decoder.conv1")}
    decoder_stats: dict[str, Any] = {}
    _batch_norm_into(head, "decoder.bn1", decoder, decoder_stats, "bn1")
    for conv_index in (0, 4):
        decoder[f"last_conv_{conv_index}"] = head.conv(f"decoder.last_conv.{conv_index}")
        bn = f"last_conv_{conv_index + 1}"
        _batch_norm_into(head, f"decoder.last_conv.{conv_index + 1}", decoder, decoder_stats, bn)
    final = head.conv("decoder.last_conv.8")
    if final["kernel"].shape[-1] != 2 or "bias" not in final:
        raise ConversionError(
            f"{state.source}: decoder.last_conv.8 should be the original's 2-class conv with a "
            f"bias, found kernel {final['kernel'].shape} (HWIO) and bias: {'bias' in final}"
        )
    decoder["last_conv_8"] = {
        "kernel": final["kernel"][..., 1:] - final["kernel"][..., :1],
        "bias": final["bias"][1:] - final["bias"][:1],
    }
    head.check_all_used()

    variables = {
        "params": {"backbone": backbone_vars["params"], "aspp": aspp, "decoder": decoder},
        "batch_stats": {
            "backbone": backbone_vars["batch_stats"],
            "aspp": aspp_stats,
            "decoder": decoder_stats,
        },
    }
    if template is None:
        template = _model_template(backbone)
    check_matches(variables, template, f"{backbone} DeepLabV3+")
    return variables


def is_original_checkpoint(state: StateDict) -> bool:
    """Whether ``state`` holds a whole original project model rather than a backbone."""
    return any(key.startswith(_ORIGINAL_MODULES) for key in state.tensors)


def convert_file(
    path: str | os.PathLike, backbone: str, template: Variables | None = None
) -> tuple[Variables, bool]:
    """``(variables, whole_model)`` of a ``.pth`` file: a whole model from an original
    project checkpoint, else a torchvision backbone."""
    state = StateDict(load_state_dict(path), os.fspath(path))
    if is_original_checkpoint(state):
        return convert_original_deeplab(state, backbone, template), True
    return convert_backbone(state, backbone), False


def save_variables(variables: Variables, path: str | os.PathLike) -> None:
    """Writes ``variables`` to a ``.msgpack`` file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(
        path, flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    )


def load_variables(path: str | os.PathLike) -> Variables:
    """Reads variables written by ``save_variables``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConversionError(f"Cannot read {path}: {e.strerror}") from e
    try:
        variables = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types
        raise ConversionError(f"{path} is not a converted .msgpack file: {e}") from e
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        raise ConversionError(f"{path} does not hold {{'params', 'batch_stats'}} variables")
    return variables


def torchvision_file(name: str) -> Path:
    """The official torchvision file of ``name`` (one of ``TORCHVISION_FILES``) in the torch
    hub cache, downloaded if needed.

    Raises:
        ConversionError: no file and no download; says where to put it.
    """
    try:
        import torch.hub
    except ImportError as e:
        raise ConversionError(f"torchvision:{name} needs PyTorch: pip install -e '.[torch]'") from e
    filename = TORCHVISION_FILES[name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        url = _TORCHVISION_URL + filename
        try:  # sha256 prefix from the name, as torch.hub.load_state_dict_from_url checks it
            torch.hub.download_url_to_file(url, str(path), filename.split("-")[-1][:-4])
        except Exception as e:  # URLError, timeouts, hash mismatch
            raise ConversionError(
                f"could not download {url} ({e}); place the file at {path} or set "
                "config.model.pretrained to a local path"
            ) from e
    return path


def check_pretrained(spec: str, backbone: str) -> None:
    """Raises ConversionError if ``spec`` (as ``load_pretrained`` takes it) cannot name
    weights for ``backbone``: an unknown kind of file, a local file that is not there, an
    unknown torchvision model or another backbone's, or a torchvision file that is neither in
    torch's hub cache nor downloadable (it is downloaded here). Reads no weights."""
    if spec.startswith("torchvision:"):
        name = spec.removeprefix("torchvision:")
        if name not in TORCHVISION_FILES:
            raise ConversionError(
                f"Unknown torchvision model {name!r}; known: {', '.join(TORCHVISION_FILES)}."
            )
        if name != backbone:
            raise ConversionError(f"{spec} does not fit config.model.backbone={backbone!r}")
        torchvision_file(name)
        return
    if not spec.endswith((".msgpack", *_TORCH_SUFFIXES)):
        raise ConversionError(
            f"Unknown pretrained weights {spec!r}: expected a .pth/.pth.tar/.pt file, a "
            ".msgpack file or torchvision:<name>"
        )
    if not Path(spec).is_file():
        raise ConversionError(f"Pretrained weights not found: {spec}")


def unlike_the_original(model_config: Any, input_config: Any = None) -> list[str]:
    """The overrides that give the original project's upsampling (``align_corners``) and, where
    ``input_config`` is given, its preprocessing (BGR, mean 98, std 80 on 0-255 values),
    which its whole models need; empty where the configs have them."""
    unlike = []
    if not model_config.get("align_corners", False):
        unlike.append("--config.model.align_corners=True")
    if input_config is not None:
        if input_config.channel_order != "BGR":
            unlike.append("--config.input.channel_order=BGR")
        if set(input_config.mean) != {98}:  # (98,) or (98, 98, 98)
            unlike.append("--config.input.mean=98")
        if set(input_config.std) != {80}:
            unlike.append("--config.input.std=80")
    return unlike


def load_pretrained(
    spec: str | None, variables: Variables, model_config: Any, input_config: Any = None
) -> Variables:
    """The model's ``variables`` with pretrained weights put in, for the trainer.

    Args:
        spec: ``None`` or ``""`` (nothing to load); a torchvision backbone or original project
            checkpoint (``.pth``, ``.pth.tar``, ``.pt``); a ``.msgpack`` written by this
            module's CLI; or ``"torchvision:<name>"``, the official file of a backbone.
        variables: the freshly initialised ``{"params", "batch_stats"}``; also the template
            every loaded tensor's shape is checked against.
        model_config: ``config.model``; its ``backbone`` picks the converter.
        input_config: ``config.input``, compared with the original project's preprocessing
            where the file is a whole original model (None: not compared).

    Returns:
        ``variables`` with the backbone replaced (backbone files) or everything replaced
        (whole original checkpoints), as JAX arrays.

    Raises:
        ConversionError: unreadable, unknown or mismatched weights, in one line.
    """
    if not spec:
        return variables
    backbone = model_config.get("backbone", DeepLabV3Plus.backbone)
    check_pretrained(spec, backbone)
    if spec.startswith("torchvision:"):
        name = spec.removeprefix("torchvision:")
        loaded = convert_backbone(
            StateDict(load_state_dict(torchvision_file(name)), spec), backbone
        )
        whole = False
    elif spec.endswith(".msgpack"):
        loaded = load_variables(spec)
        whole = "backbone" in loaded["params"]
        held = _held_by_variables(loaded["params"]["backbone"] if whole else loaded["params"])
        if held and held != backbone:
            raise ConversionError(
                f"{spec} holds a {held} {'DeepLabV3+' if whole else 'backbone'}, but "
                f"config.model.backbone is {backbone!r}"
            )
    else:  # a PyTorch file (check_pretrained)
        loaded, whole = convert_file(spec, backbone, template=variables)
    loaded = jax.tree.map(jnp.asarray, loaded)
    if whole:
        merged = loaded
        unlike = unlike_the_original(model_config, input_config)
        if unlike:
            logging.warning(
                "%s is a whole model of the original project, trained with other settings: "
                "to reproduce its predictions, set %s.",
                spec,
                " ".join(unlike),
            )
    else:
        merged = {
            kind: {**variables[kind], "backbone": loaded[kind]}
            for kind in ("params", "batch_stats")
        }
    check_matches(merged, variables, f"pretrained file {spec}")
    return merged


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    options = flags.FLAGS
    if not options.out.endswith(".msgpack"):  # config.model.pretrained reads by the suffix
        sys.exit(f"FATAL --out={options.out} must end in .msgpack.")
    cli.quiet_libraries()
    start = time.perf_counter()
    with cli.ending_on_ctrl_c("while converting"):
        try:
            sharding.start_backend()
            variables, whole = convert_file(options.torch, options.backbone)
            save_variables(variables, options.out)
        except (ConversionError, sharding.ShardingError) as e:
            sys.exit(f"FATAL {e}")
        except OSError as e:  # --out: no permission, a folder of that name, ...
            sys.exit(f"FATAL Cannot write --out={options.out}: {e}")
    what = f"{options.backbone} DeepLabV3+" if whole else f"{options.backbone} backbone"
    print(
        f"Converted {len(jax.tree.leaves(variables))} tensors ({what}) from {options.torch} "
        f"to {options.out} in {time.perf_counter() - start:.1f} s."
    )


if __name__ == "__main__":
    flags.DEFINE_string("torch", None, "PyTorch checkpoint (.pth): torchvision or original.")
    flags.DEFINE_string("out", None, "Output .msgpack file.")
    flags.DEFINE_string(
        "backbone", "resnet101", "Backbone of the checkpoint (resnet18..152, mobilenet_v2)."
    )
    flags.mark_flags_as_required(["torch", "out"])
    app.run(main, flags_parser=cli.parse_flags)
