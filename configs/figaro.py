"""DeepLabV3+ ResNet-101 on Figaro1k with the original project's defaults.

Variants (``--config=configs/figaro.py:VARIANT``):
  smoke: about 20 steps of a small ResNet-18 model on 16 real images at 96 px, evaluated on
    8 images; for tests and quick checks.
  scratch: the same ResNet-101 trained from scratch on one GPU (bf16, batch 32 of 320 px
    crops, AdamW with warmup and cosine, BCE + soft Dice, EMA); see README's Results.
"""

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Returns the experiment config; ``variant`` picks a named variant."""
    config = ml_collections.ConfigDict()
    config.mode = "train"  # train | eval | predict
    config.seed = 0
    # JAX keeps compiled steps here; a later run of the same model and shapes loads them
    # instead of compiling (ResNet-101 on a 2-core CPU: a training run starts 28 s sooner, an
    # eval 4-7 s). "" keeps none; $JAX_COMPILATION_CACHE_DIR, where set, is used instead.
    config.compilation_cache = "~/.cache/hairseg_jax/jax"

    # Several hosts: jax.distributed.initialize() first. SLURM, Open MPI, Kubernetes and Cloud
    # TPU are detected; elsewhere set the three fields below on every host.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    config.distributed.coordinator_address = ""  # host:port of process 0 ("" detected)
    config.distributed.num_processes = 0  # 0: detected
    config.distributed.process_id = -1  # -1: detected
    config.distributed.initialization_timeout = 300  # s to wait for every process to join

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "figaro1k"  # figaro1k | synthetic
    config.data.data_dir = "data/Figaro1k"
    config.data.split_file = "train_val_test.json"  # relative to data_dir unless absolute
    config.data.mask_source = "auto"  # auto (PBM, else .npy) | pbm | npy
    config.data.max_train_images = 0  # 0: all; N: N spread evenly over the split file
    config.data.max_val_images = 0
    config.data.skip_unreadable = False  # True: log and leave out undecodable examples
    config.data.image_size = 227  # side of the square training crops
    # Progressive resizing: earlier stages train on smaller, faster crops. Sizes (96,) until
    # (0.6,) crop 96 px for the first 60% of the steps, then image_size to the end.
    config.data.progressive_sizes = ()
    config.data.progressive_until = ()  # fraction of the steps at which each of those ends

    # Pixel normalisation before the model; ImageNet statistics match torchvision's weights.
    config.input = ml_collections.ConfigDict()
    config.input.mean = (123.675, 116.28, 103.53)
    config.input.std = (58.395, 57.12, 57.375)
    config.input.channel_order = "RGB"  # RGB | BGR

    # Spatial transforms move image and mask together; colour ones touch the image only.
    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True  # False: whole images resized to the crop size (ablations)
    config.augment.scale = (0.25, 1.0)  # random resized crop: fraction of the image area
    config.augment.ratio = (3 / 4, 4 / 3)  # and aspect ratio range
    config.augment.rotation = 15.0  # degrees, uniform in [-r, r]
    config.augment.hflip = True
    config.augment.vflip = False
    config.augment.brightness = 0.2  # 0 switches a colour transform off
    config.augment.contrast = 0.2
    config.augment.saturation = 0.2
    config.augment.hue = 0.05
    # True: batches are drawn and augmented on the accelerator (data/device_augment.py), from
    # the training images shrunk to device_max_side at most and kept there; for hosts with
    # too few CPU cores to feed a fast accelerator through tf.data.
    config.augment.on_device = False
    config.augment.device_max_side = 512

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "resnet101"  # resnet18|34|50|101|152 | mobilenet_v2
    config.model.output_stride = 16  # 16 | 8 | 32
    config.model.multi_grid = (1, 2, 4)
    config.model.aspp_channels = 256
    config.model.decoder_channels = 256
    config.model.dropout = 0.5
    config.model.dtype = "float32"  # bfloat16: bf16 compute; params, BN statistics, loss in fp32
    # Bilinear upsampling mapping corners onto corners; True for the original's checkpoints.
    config.model.align_corners = False
    # Weights to start from ("" is none; a None default could not be overridden by a string):
    # "torchvision:resnet101" (the official file, downloaded into the torch hub cache), a
    # torchvision or original project .pth file, or a .msgpack from hairseg_jax.weights.convert.
    config.model.pretrained = ""

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "sgd"  # sgd | adamw
    config.optim.learning_rate = 0.01
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.weight_decay = 5e-4
    config.optim.head_lr_multiplier = 10.0
    config.optim.schedule = "poly"  # poly | cosine | constant
    config.optim.poly_power = 0.9
    config.optim.warmup_steps = 0

    config.loss = ml_collections.ConfigDict()
    config.loss.dice_weight = 0.0  # > 0 adds this times the soft Dice loss to the BCE

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 16  # global: split over all devices; must divide by their number
    config.train.num_epochs = 50
    config.train.num_steps = 0  # > 0 overrides num_epochs
    config.train.log_every_steps = 20
    config.train.eval_every_steps = 0  # 0: once per epoch
    config.train.keep_checkpoints = 2
    # Every evaluation saves a checkpoint; > 0 also saves one every this many steps, so a run
    # killed between evaluations (SIGKILL, a lost machine) loses at most that many steps.
    config.train.checkpoint_every_steps = 0
    # > 0 keeps an EMA of the weights and evaluates with it; its decay is
    # min(ema_decay, (1 + step) / (10 + step)), which reaches 0.998 only at step 4490.
    config.train.ema_decay = 0.0
    # A step with a non-finite loss, gradient or update changes no weights; training then
    # stops with an error naming the step, or with True skips it, counts it and goes on.
    config.train.skip_nonfinite = False
    # Training in a workdir whose config.json differs in fields that matter (not eval.*,
    # logging, checkpoint frequency, data_dir, ...) stops naming them; True continues anyway.
    config.train.allow_config_change = False

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"  # split that --config.mode=eval reports
    config.eval.image_size = 227  # whole images are resized to this square for the model
    config.eval.batch_size = 8  # rounded up to a multiple of the number of devices
    # Probability above which a pixel is hair; -1: the workdir's threshold.json if it was tuned
    # for the evaluated checkpoint, else 0.5 (so validation during training uses 0.5).
    config.eval.threshold = -1.0
    # True: first pick the threshold with the best mean Dice on val (0.05..0.95), save it as
    # <workdir>/threshold.json for this checkpoint.
    config.eval.tune_threshold = False
    config.eval.tta = "none"  # none | flip (mean of the logits of the image and its mirror)
    # Multi-scale test-time augmentation: more sizes (e.g. (192, 256)) whose logits, resized to
    # each image's resolution, are averaged with those of image_size.
    config.eval.tta_sizes = ()
    config.eval.max_images = 0  # 0: all (also limits the val images of tune_threshold)
    config.eval.preview_images = 3  # val images (image | truth | prediction) to TensorBoard

    # --config.mode=predict: masks and overlays for any images (see README, Predict).
    config.predict = ml_collections.ConfigDict()
    config.predict.input = ""  # an image file, a folder (its image files) or a glob pattern
    config.predict.output = ""  # folder for <name>_mask.png, <name>_overlay.jpg, ...
    config.predict.image_size = 0  # images are resized to this square for the model; 0: eval's
    config.predict.batch_size = 8  # rounded up to a multiple of the number of devices
    config.predict.threshold = -1.0  # as eval.threshold: -1 is the tuned one, else 0.5
    config.predict.tta = "none"  # none | flip
    config.predict.save_prob = ""  # "" | png (8-bit probability) | npy (float32 probability)

    if variant == "smoke":
        config.data.max_train_images = 16
        config.data.max_val_images = 8
        config.data.image_size = 96
        config.model.backbone = "resnet18"
        config.model.aspp_channels = 64
        config.model.decoder_channels = 64
        config.train.batch_size = 4
        config.train.num_steps = 20
        config.train.log_every_steps = 5
        config.train.eval_every_steps = 10
        config.eval.image_size = 96
        config.eval.batch_size = 4
        config.eval.max_images = 8
    elif variant == "scratch":
        config.data.image_size = 320
        config.augment.scale = (0.35, 1.0)
        config.augment.hue = 0.02
        config.augment.on_device = True  # as measured; tf.data at 800 img/s needs many cores
        config.augment.device_max_side = 448
        config.model.dtype = "bfloat16"
        config.model.dropout = 0.1
        config.optim.name = "adamw"
        config.optim.learning_rate = 1e-3
        config.optim.weight_decay = 1e-4
        config.optim.head_lr_multiplier = 1.0  # no pretrained backbone to protect
        config.optim.schedule = "cosine"
        config.optim.warmup_steps = 500
        config.loss.dice_weight = 0.5
        config.train.batch_size = 32
        config.train.num_steps = 7106  # 286 s (40 ms/step, batches drawn on the GPU) on one H100
        config.train.eval_every_steps = 1000
        config.train.ema_decay = 0.999
        # Whole images at 1.4x the crop side match the scale hair has in the random crops.
        config.eval.image_size = 448
        config.eval.batch_size = 16
    elif variant:
        raise ValueError(
            f"Unknown variant {variant!r} of configs/figaro.py; known: smoke, scratch."
        )
    return config
