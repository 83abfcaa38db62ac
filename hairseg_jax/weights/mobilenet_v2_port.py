"""torchvision ``mobilenet_v2`` state dict -> variables of the Flax ``MobileNetV2`` backbone.

The name mapping is the table in ``hairseg_jax.models.mobilenet_v2``. ``features.18`` (the
1280-channel conv) and ``classifier`` have no Flax counterpart and are ignored.
"""

from typing import Any

from hairseg_jax.models.mobilenet_v2 import block_plan
from hairseg_jax.weights.tensors import StateDict

# torchvision tensors that DeepLab's MobileNetV2 does not use.
UNUSED_PREFIXES = ("features.18.", "classifier.")


def _conv_bn_relu6(state: StateDict, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({"conv", "bn"}, {"bn"})`` of a torchvision ``Conv2dNormActivation`` at ``prefix``."""
    bn_params, bn_stats = state.batch_norm(f"{prefix}.1")
    return {"conv": state.conv(f"{prefix}.0"), "bn": bn_params}, {"bn": bn_stats}


def convert_mobilenet_v2(state: StateDict) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the backbone subtree from a torchvision state dict.

    Takes every ``features.0`` .. ``features.17`` tensor from ``state``, so that
    ``state.check_all_used(UNUSED_PREFIXES)`` afterwards reports any leftovers.

    Raises:
        ConversionError: a tensor is missing.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    params["features_0"], stats["features_0"] = _conv_bn_relu6(state, "features.0")
    # Which blocks expand does not depend on the output stride.
    for i, (expand_ratio, *_) in enumerate(block_plan(32), start=1):
        prefix = f"features.{i}.conv"
        block_params: dict[str, Any] = {}
        block_stats: dict[str, Any] = {}
        names = ("depthwise",) if expand_ratio == 1 else ("expand", "depthwise")
        for j, name in enumerate(names):
            block_params[name], block_stats[name] = _conv_bn_relu6(state, f"{prefix}.{j}")
        block_params["project_conv"] = state.conv(f"{prefix}.{len(names)}")
        block_params["project_bn"], block_stats["project_bn"] = state.batch_norm(
            f"{prefix}.{len(names) + 1}"
        )
        params[f"features_{i}"], stats[f"features_{i}"] = block_params, block_stats
    return {"params": params, "batch_stats": stats}
