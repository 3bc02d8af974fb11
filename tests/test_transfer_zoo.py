"""Transfer learning with every torchvision family: the head is replaced; feature extraction leaves the backbone
and its BatchNorm statistics bit-identical; fine-tuning from a stage moves only that stage onwards."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from cnnjax import checkpoint, models, transfer
from cnnjax.data import Dataset
from cnnjax.train.experiment import build
from cnnjax.train.runner import Runner
from cnnjax.train.state import init_variables
from experiments.configs.base import base_config
from tests.test_port_zoo import FAMILY_MEMBERS


# The default suite freezes a BatchNorm net with SE blocks and stochastic depth (feature extraction) and fine-tunes a
# LayerNorm net from its last stage; -m slow runs both on one member of every family.
def _cases(default: str) -> list:
    return [name if name == default else pytest.param(name, marks=pytest.mark.slow) for name in FAMILY_MEMBERS]


def _size(arch: str) -> int:
    return max(FAMILY_MEMBERS[arch], 64)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Per arch: a 1000-class checkpoint as experiments.port writes it (random weights, non-trivial statistics)."""
    made = {}

    def make(arch):
        if arch not in made:
            model, size = models.create(arch), _size(arch)
            variables = init_variables(model, (size, size, 3), jax.random.PRNGKey(0), train=False)
            if "batch_stats" in variables:
                x = jax.random.normal(jax.random.PRNGKey(1), (4, size, size, 3)) * 2 + 1
                _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                           rngs={"dropout": jax.random.PRNGKey(2)}))(variables)
                variables = {**variables, "batch_stats": updates["batch_stats"]}
            path = str(tmp_path_factory.mktemp(arch))
            checkpoint.save(path, 0, variables, {"epoch": 0})
            made[arch] = path, jax.device_get(variables)
        return made[arch]

    return make


def _train(arch, init_from, mode, unfreeze_from="stem"):
    size = _size(arch)
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (16, size, size, 3)).astype(np.uint8)
    labels = (np.arange(16) % 3).astype(np.int32)
    data = Dataset("cifar10", images, labels, images[:4], labels[:4], ("a", "b", "c"))
    config = base_config()
    config.model.name, config.num_classes, config.data.name = arch, 3, "cifar10"
    config.optimizer, config.learning_rate = "sgd", 0.1
    config.transfer.init_from, config.transfer.mode = init_from, mode
    config.transfer.unfreeze_from, config.transfer.backbone_lr = unfreeze_from, 0.01
    model, spec, state, _ = build(config, data, steps_per_epoch=2)
    start = jax.device_get(state)
    runner = Runner(spec, model.apply)
    placed = runner.put_data(data.train_images, data.train_labels)
    state, _ = runner.train(runner.put_state(state), *placed, np.arange(16).reshape(2, 8))
    return start, runner.get_state(state)


def _moved(a, b) -> bool:
    return not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("arch", _cases("mobilenet_v3_small"))
def test_feature_extraction_trains_only_a_new_head(arch, pretrained):
    path, source = pretrained(arch)
    layout = transfer.stage_layout(arch, models.DEFAULT_INPUT_SHAPES[arch])
    start, end = _train(arch, path, "feature_extraction")
    backbone = lambda tree: {k: v for k, v in tree.items() if k not in layout.head}  # noqa: E731
    chex.assert_trees_all_equal(backbone(start.params), backbone(source["params"]))
    chex.assert_trees_all_equal(backbone(end.params), backbone(source["params"]))
    chex.assert_trees_all_equal(end.batch_stats, source.get("batch_stats", {}))
    head = {k: end.params[k] for k in layout.head}
    assert _moved(head, {k: start.params[k] for k in layout.head})
    assert all(leaf.shape[-1] == 3 for name in layout.head for leaf in jax.tree_util.tree_leaves(head[name])
               if leaf.ndim == 1)


@pytest.mark.parametrize("arch", _cases("convnext_tiny"))
def test_finetune_from_the_last_stage_keeps_the_earlier_ones(arch, pretrained):
    path, source = pretrained(arch)
    layout = transfer.stage_layout(arch, models.DEFAULT_INPUT_SHAPES[arch])
    last = layout.stages[-1]
    _, end = _train(arch, path, "finetune", last)
    for name in layout.stages[:-1]:
        chex.assert_trees_all_equal(end.params.get(name, {}), source["params"].get(name, {}), custom_message=name)
    assert _moved(end.params[last], source["params"][last])
