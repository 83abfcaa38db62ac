"""Helpers shared by the weight conversion tests."""

import numpy as np


def nhwc(tensor) -> np.ndarray:
    """An NCHW torch tensor as an NHWC array."""
    return tensor.detach().numpy().transpose(0, 2, 3, 1)
