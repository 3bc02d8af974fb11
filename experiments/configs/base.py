"""Defaults shared by every experiment config; each NAME.py overrides what it needs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every config key with its default (``data`` and ``transfer`` from :func:`data_config` and
    :func:`transfer_config`)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "lenet5", "kwargs": ml_collections.ConfigDict()})
    c.num_classes = 10
    c.data = data_config()
    c.transfer = transfer_config()
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 10
    c.time_budget_s = 0.0     # > 0: train as many epochs (at most num_epochs) as fit in this many seconds
    c.budget_replans = ()     # written by a budgeted run that re-plans to fewer epochs (cnnjax.train.timeline)
    c.ensemble_members = 1    # > 1: train this many members (seed, seed + 1, ...) and score their mean logits
    c.optimizer = "sgd"       # sgd | nesterov | adam | adamw | airbench
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.schedule = "constant"   # constant | cosine | onecycle | triangular | piecewise
    c.warmup_epochs = 0.0
    c.pct_start = 0.25
    c.boundaries_epochs = (0,)
    c.decay_factor = 0.1
    c.lr_start_factor = 0.0   # triangular: start / end learning rate as a fraction of the peak
    c.lr_end_factor = 0.0
    c.bias_lr_scale = 64.0    # optimizer=airbench: BatchNorm-bias learning-rate multiplier
    c.whiten_bias_epochs = 0.0  # optimizer=airbench: train the whitening bias for this many epochs
    c.whiten_init_images = 0  # set a 'whiten' conv (fast_cnn) from this many training images (0: off)
    c.lookahead_every = 0     # airbench lookahead period in steps (0: off)
    c.tta = 0                 # test-time augmentation: 0 off, 1 mirror, 2 mirror + 1-pixel translations
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    c.mixed_precision = False  # bf16 compute, fp32 params and BN statistics (GPU / TPU)
    c.precision = "default"    # float32 matmul / conv precision: default (TF32 on NVIDIA) | high | highest
    c.deterministic = False    # GPU: XLA's deterministic ops (bit-identical reruns and resumes; slower)
    c.parallelism = "auto"     # auto (sharded with several accelerators, else jit) | jit | pmap | sharded
    c.num_devices = 0          # pmap / sharded: use the first N local devices (0: all)
    c.log_every = 50           # steps per chunk: one compiled program, one progress update
    c.loop = ml_collections.ConfigDict({"scan": "auto"})  # a chunk is one lax.scan: auto (not on CPUs) | on | off
    c.eval_every = 1           # evaluate + checkpoint every N epochs (and always after the last)
    c.plots = True
    return c


def data_config() -> ml_collections.ConfigDict:
    """``config.data``: where the images come from and how they are prepared and augmented."""
    return ml_collections.ConfigDict({
        "name": "fashion_mnist",
        "dir": "",            # local raw files (IDX dir or cifar-10-batches-py); '' = TFDS
        "tfds_data_dir": "",  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
        "cache_dir": "~/.cache/cnnjax",  # decoded-array cache; '' disables it
        "pad_to": 0,          # zero-pad images to pad_to x pad_to (0: as stored)
        "crop_padding": 0,    # random crop from this much padding
        "pad_mode": "constant",  # crop padding: constant (zeros) | reflect
        "flip": False,        # horizontal flip
        "flip_mode": "random",   # random (p=1/2 each step) | alternate (airbench: halves swap each epoch)
        "cutout": 0,          # cutout square size (0: off)
        "random_resized_crop": 0.0,  # train: random-resized crop with this min area fraction (0: off; 0.08 torchvision)
        "classes": (),        # keep only these classes (relabelled 0..k-1)
        "train_per_class": 0,  # keep K training images per class (0: all)
        "resize_to": 0,       # bilinear resize on the device to resize_to x resize_to (0: off)
        "val_fraction": 0.1,  # validation split held out of train (stratified) when the source has none
        "split_seed": 0,      # seed of the validation hold-out (and of an image folder's 70/15/15 split)
        "test_every_epoch": False,  # also evaluate test at every evaluation (else: final + best checkpoint)
        "mode": "resident",   # resident (whole splits in memory / on device) | stream (decoded by workers) | auto
        "resident_max_gb": 2.0,  # auto: resident when the decoded training split fits this many GiB
        "workers": 2,         # stream: grain worker processes decoding batches (0: in the main process)
        # Image folders (name=folder, dir=ROOT): ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>.
        "image_size": 0,      # folder: shorter side resized to this, then centre-cropped to image_size^2
        "channels": 3,        # folder: 3 (RGB) or 1 (grey)
        "split_fractions": (0.7, 0.15, 0.15),  # folder: train / val / test of a single tree (stratified)
        "skip_bad_images": False,  # folder: skip (and count) undecodable images instead of stopping
    })


def transfer_config() -> ml_collections.ConfigDict:
    """``config.transfer``, transfer learning (any zoo model): start from a checkpoint dir (a training workdir or
    experiments.port's output), replace the head, freeze stages. mode: scratch | feature_extraction | finetune."""
    return ml_collections.ConfigDict({
        "init_from": "",
        "mode": "scratch",
        "unfreeze_from": "stem",   # finetune: first trainable stage (stem, or a top-level module / prefix: layer3)
        "backbone_lr": 1e-4,       # finetune: learning rate of the unfrozen backbone stages
        "head_first_epochs": 0,    # finetune: train only the head for this many epochs first
    })


def cifar10_config(model: str) -> ml_collections.ConfigDict:
    """CIFAR-10 with the standard augmentation (random crop from 4-pixel padding + horizontal flip)."""
    c = base_config()
    c.model.name = model
    c.data.name = "cifar10"
    c.data.crop_padding = 4
    c.data.flip = True
    return c
