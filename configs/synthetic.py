"""A small model on in-memory synthetic hair images: runs anywhere, no dataset needed."""

import ml_collections

from configs import figaro


def get_config() -> ml_collections.ConfigDict:
    """figaro.py's settings on synthetic data, sized for about a minute on a 2-core CPU."""
    config = figaro.get_config()
    config.data.dataset = "synthetic"
    config.data.synthetic_size = 96  # side of the synthetic images
    config.data.synthetic_counts = {"train": 256, "val": 32, "test": 32}
    config.data.image_size = 64
    config.augment.scale = (0.5, 1.0)
    config.model.backbone = "resnet18"
    config.model.aspp_channels = 64
    config.model.decoder_channels = 64
    config.train.batch_size = 16
    config.train.num_epochs = 6
    config.train.log_every_steps = 16
    config.eval.image_size = 64
    config.eval.batch_size = 16
    return config
