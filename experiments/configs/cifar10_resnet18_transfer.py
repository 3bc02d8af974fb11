"""ResNet-18 with ported ImageNet weights on CIFAR-10 (needs the data and the weight file).

First port the weights: ``python -m experiments.port --arch resnet18 --weights resnet18-f37072fd.pth
--out workdirs/resnet18_imagenet``. Then fine-tune the whole backbone (head alone for the first epoch)
at 32x32:
``python -m experiments.train --config experiments/configs/cifar10_resnet18_transfer.py --workdir DIR``.
``--config.data.resize_to=224`` upsamples on the device to the backbone's native resolution
(about 49x the compute per image); ``--config.transfer.unfreeze_from=layer3`` keeps the earlier stages
frozen; ``--config.transfer.mode=feature_extraction`` trains the head only.
"""

from experiments.configs import cifar10_resnet18


def get_config():
    c = cifar10_resnet18.get_config()  # same data, augmentation and batch; transfer-specific below
    c.data.resize_to = 0
    c.num_epochs = 10
    c.optimizer = "sgd"
    c.learning_rate = 1e-2          # head
    c.schedule = "cosine"
    c.warmup_epochs = 0
    c.transfer.init_from = "workdirs/resnet18_imagenet"
    c.transfer.mode = "finetune"
    c.transfer.unfreeze_from = "stem"
    c.transfer.backbone_lr = 1e-3   # 10x smaller than the head
    c.transfer.head_first_epochs = 1
    return c
