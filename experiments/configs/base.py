"""Defaults shared by every experiment config; each NAME.py overrides what it needs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "lenet5", "kwargs": ml_collections.ConfigDict()})
    c.num_classes = 10
    c.data = ml_collections.ConfigDict({
        "name": "fashion_mnist",
        "dir": "",            # local raw files (IDX dir or cifar-10-batches-py); '' = TFDS
        "tfds_data_dir": "",  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
        "cache_dir": "~/.cache/cnnjax",  # decoded-array cache; '' disables it
        "pad_to": 0,          # zero-pad images to pad_to x pad_to (0: as stored)
        "crop_padding": 0,    # random crop from this much zero padding
        "flip": False,        # random horizontal flip
        "cutout": 0,          # cutout square size (0: off)
        "classes": (),        # keep only these classes (relabelled 0..k-1)
        "train_per_class": 0,  # keep K training images per class (0: all)
        "resize_to": 0,       # bilinear resize on the device to resize_to x resize_to (0: off)
    })
    # Transfer learning (ResNets): start from a checkpoint dir (training workdir or experiments.port
    # output), replace the head, freeze stages. mode: scratch | feature_extraction | finetune.
    c.transfer = ml_collections.ConfigDict({
        "init_from": "",
        "mode": "scratch",
        "unfreeze_from": "stem",   # finetune: first trainable stage (stem, layer1..layer4)
        "backbone_lr": 1e-4,       # finetune: learning rate of the unfrozen backbone stages
        "head_first_epochs": 0,    # finetune: train only the head for this many epochs first
    })
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 10
    c.optimizer = "sgd"       # sgd | nesterov | adam | adamw
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.schedule = "constant"   # constant | cosine | onecycle | triangular | piecewise
    c.warmup_epochs = 0.0
    c.pct_start = 0.25
    c.boundaries_epochs = (0,)
    c.decay_factor = 0.1
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    c.mixed_precision = False  # bf16 compute, fp32 params and BN statistics (GPU / TPU)
    c.parallelism = "jit"      # jit | pmap | sharded
    c.num_devices = 0          # pmap / sharded: use the first N local devices (0: all)
    c.log_every = 50           # steps per progress update / host sync
    c.eval_every = 1           # evaluate + checkpoint every N epochs (and always after the last)
    c.plots = True
    return c


def cifar10_config(model: str) -> ml_collections.ConfigDict:
    """CIFAR-10 with the standard augmentation (random crop from 4-pixel padding + horizontal flip)."""
    c = base_config()
    c.model.name = model
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    return c
