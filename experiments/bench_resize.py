"""Cost of upsampling CIFAR-size images to 224 on the device for a ResNet-18 (transfer-learning choice).

``python -m experiments.bench_resize`` prints train img/s at 32x32 and with ``resize_to=224``.
"""

from __future__ import annotations

from experiments import cli  # noqa: F401  (sets the CPU XLA flag, as the other entry points)


def measure(resize_to: int, batch: int = 16, steps: int = 5) -> float:
    """Steady-state train images/s of ResNet-18 on 32x32 uint8 inputs, optionally resized on the device."""
    from cnnjax import models
    from cnnjax.train.steps import StepSpec
    from experiments.benchlib import time_jax_training

    spec = StepSpec(10, (0.5,) * 3, (0.25,) * 3, resize_to=resize_to)
    model_input = (resize_to, resize_to, 3) if resize_to else None
    return time_jax_training(models.create("resnet18", num_classes=10), spec, (32, 32, 3), batch, steps,
                             model_input_shape=model_input)["train_img_s"]


if __name__ == "__main__":
    for size in (0, 224):
        print(f"resnet18 train, 32x32 input, resize_to={size or 'off'}: {measure(size):.1f} img/s (batch 16)")
