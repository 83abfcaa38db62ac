"""Reading PyTorch state dicts into NumPy and taking them apart tensor by tensor.

torch is imported lazily, only by ``load_state_dict``; the rest is NumPy and JAX.
"""

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

_INSTALL_HINT = "pip install -e '.[torch]'"


class ConversionError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def _safe_globals() -> list[tuple[Any, str]]:
    """NumPy scalar types that checkpoints pickle next to the tensors (the original project's
    ``best_pred`` may be a NumPy float, another's epoch a NumPy int), allowed by name so that
    torch.load can keep ``weights_only=True``; both numpy 1's and numpy 2's module names."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        *(
            (dtype, f"numpy.dtypes.{dtype.__name__}")
            for dtype in (
                np.dtypes.Float64DType,
                np.dtypes.Float32DType,
                np.dtypes.Float16DType,
                np.dtypes.Int64DType,
                np.dtypes.Int32DType,
                np.dtypes.BoolDType,
            )
        ),
    ]


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as float32 (floating point) or its own integer/bool NumPy dtype."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy().copy()


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` file's tensors as NumPy arrays keyed like the torch module.

    Unwraps ``{"state_dict": ...}`` (the original project's checkpoints) and
    ``{"model": ...}``, strips ``nn.DataParallel``'s leading ``module.`` and drops BatchNorm's
    ``num_batches_tracked``. Floating point tensors become float32.

    Raises:
        ConversionError: torch is missing, or the file is missing, truncated, not a torch
            checkpoint, or holds no tensors.
    """
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"Reading {path} needs PyTorch: {_INSTALL_HINT}") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"Checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ConversionError(_describe(path, e).splitlines()[0]) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    state = {
        key.removeprefix("module."): _to_numpy(value)
        for key, value in obj.items()
        if isinstance(value, torch.Tensor) and not key.endswith("num_batches_tracked")
    }
    if not state:
        raise ConversionError(f"{path} holds no tensors; keys: {_preview(list(obj))}")
    return state


def _describe(path: str, error: BaseException) -> str:
    """Why torch.load failed on ``path``, in one line."""
    with open(path, "rb") as f:
        head = f.read(4)
    unsafe = re.search(  # a global torch would not look up, or a type it would not build
        r"Unsupported global: GLOBAL (\S+)|add_safe_globals`, but got <class '([^']+)'>",
        str(error),
    )
    if unsafe:
        return (
            f"{path} pickles a {unsafe.group(1) or unsafe.group(2)}, not only tensors (refused "
            "for safety); save the state dict alone (model.state_dict()) instead"
        )
    if head.startswith(b"PK"):
        return f"{path} is truncated or corrupt: {str(error).split('.')[0]}"
    if not head.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle
        return f"{path} is not a PyTorch checkpoint (not a zip archive or pickle)"
    return f"{path} is not a readable PyTorch checkpoint: {type(error).__name__}: {error}"


def _preview(keys: Sequence[str], limit: int = 10) -> str:
    """``keys`` comma-separated, the first ``limit`` of them."""
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def hwio(kernel: np.ndarray) -> np.ndarray:
    """A torch conv kernel (O, I, H, W) in Flax's layout (H, W, I, O)."""
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))


class StateDict:
    """A state dict whose tensors are taken one by one, recording which were used."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "state dict") -> None:
        self.tensors = dict(tensors)
        self.source = source
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> np.ndarray:
        """The tensor ``key``, marked used; a missing key names its nearest neighbours."""
        if key not in self.tensors:
            close = difflib.get_close_matches(key, self.tensors, n=3, cutoff=0.6)
            hint = f"; close keys: {', '.join(close)}" if close else ""
            raise ConversionError(f"{self.source} has no tensor {key!r}{hint}")
        self._used.add(key)
        return self.tensors[key]

    def conv(self, prefix: str) -> dict[str, np.ndarray]:
        """``{"kernel"}`` (HWIO) of the conv ``prefix``, plus ``"bias"`` if it has one."""
        kernel = self.take(f"{prefix}.weight")
        if kernel.ndim != 4:
            raise ConversionError(
                f"{self.source}: {prefix}.weight has shape {tuple(kernel.shape)}, not a "
                "convolution's (out, in, height, width)"
            )
        params = {"kernel": hwio(kernel)}
        if f"{prefix}.bias" in self.tensors:
            params["bias"] = self.take(f"{prefix}.bias")
        return params

    def batch_norm(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``({"scale", "bias"}, {"mean", "var"})`` of the BatchNorm ``prefix``."""
        params = {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}
        stats = {
            "mean": self.take(f"{prefix}.running_mean"),
            "var": self.take(f"{prefix}.running_var"),
        }
        return params, stats

    def unused(self, ignore_prefixes: Sequence[str] = ()) -> list[str]:
        """Keys not taken yet, except those starting with one of ``ignore_prefixes``."""
        return [
            key
            for key in self.tensors
            if key not in self._used and not key.startswith(tuple(ignore_prefixes))
        ]

    def check_all_used(self, ignore_prefixes: Sequence[str] = ()) -> None:
        """Raises ConversionError listing the tensors that no model variable took."""
        unused = self.unused(ignore_prefixes)
        if unused:
            raise ConversionError(
                f"{self.source} has {len(unused)} tensors the model does not use: "
                f"{_preview(unused)}"
            )


def _leaves(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/backbone/conv1/kernel": shape}`` of a nested dict of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
        for path, leaf in flat
    }


def check_matches(variables: Any, template: Any, what: str = "checkpoint") -> None:
    """Raises ConversionError unless ``variables`` has exactly ``template``'s leaves and shapes.

    ``template`` may hold arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
    """
    got, want = _leaves(variables), _leaves(template)
    problems = []
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k} {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]
    if missing:
        problems.append(f"{len(missing)} missing: {_preview(missing, 5)}")
    if extra:
        problems.append(f"{len(extra)} unexpected: {_preview(extra, 5)}")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (file vs model): {_preview(shapes, 5)}")
    if problems:
        raise ConversionError(f"The {what} does not fit the model: " + "; ".join(problems))
