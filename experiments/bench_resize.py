"""Cost of upsampling CIFAR-size images to 224 on the device for a ResNet-18 (transfer-learning choice).

``python -m experiments.bench_resize`` prints train img/s at 32x32 and with ``resize_to=224``.
"""

import time

import jax
import numpy as np
import optax

from cnnjax import models
from cnnjax.train.state import create_train_state
from cnnjax.train.steps import Runner, StepSpec
from experiments import cli  # noqa: F401  (sets the CPU XLA flag like the entry points)

m = models.create("resnet18", num_classes=10)
B = 16
imgs = np.random.RandomState(0).randint(0, 255, (B, 32, 32, 3)).astype(np.uint8); labels = np.zeros(B, np.int32)
for r in (0, 224):
    spec = StepSpec(10, (0.5,)*3, (0.25,)*3, resize_to=r)
    shape = (r, r, 3) if r else (32, 32, 3)
    run = Runner(spec, m.apply)
    st = run.put_state(create_train_state(m, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0)))
    i, l = run.put_data(imgs, labels); idx = np.arange(B)[None]
    st, mm = run.train(st, i, l, idx); jax.block_until_ready(mm)
    n = 5; t = time.perf_counter()
    for _ in range(n): st, mm = run.train(st, i, l, idx)
    jax.block_until_ready(mm); dt = time.perf_counter() - t
    print(f"resnet18 train, CIFAR-size input, resize_to={r or 'off (32x32)'}: {n*B/dt:.1f} img/s, {dt/n*1000:.0f} ms/step (batch {B})")
