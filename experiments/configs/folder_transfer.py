"""Transfer learning on your own image folder (the tutorial's practice task).

A torchvision-layout ResNet (ResNet-50 by default) with weights from ``experiments.port`` (or any
cnnjax checkpoint of the same architecture) learns a new head on ``ROOT/<class>/<image>``, split
70/15/15 (stratified) unless ROOT has train/val/test folders; images are resized to 224x224;
the best checkpoint is chosen on validation accuracy and the test split is evaluated at the end.

    python -m experiments.train --config experiments/configs/folder_transfer.py --workdir DIR \\
        --config.data.dir=ROOT --config.transfer.init_from=workdirs/resnet50_imagenet

Feature extraction (frozen backbone, BatchNorm in eval mode) by default; fine-tune with
``--config.transfer.mode=finetune [--config.transfer.unfreeze_from=layer3]``. The number of classes
is taken from the folder.
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "resnet50"
    c.num_classes = 0               # 0: as many as the folder has
    c.data.name = "folder"
    c.data.dir = ""                 # ROOT, required
    c.data.image_size = 224
    c.data.channels = 3
    c.data.flip = True
    c.data.mode = "auto"            # resident when the decoded training split fits data.resident_max_gb
    c.data.cache_dir = ""
    c.transfer.mode = "feature_extraction"
    c.transfer.init_from = ""       # required: experiments.port output or a training workdir
    c.transfer.backbone_lr = 1e-4   # finetune only
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 5
    c.log_every = 5
    return c
