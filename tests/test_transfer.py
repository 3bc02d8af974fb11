"""Transfer learning: trainable counts, frozen backbones stay bit-identical, fine-tuning moves them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import checkpoint, models, transfer
from cnnjax.data import Dataset
from cnnjax.train.experiment import build
from cnnjax.train.runner import Runner
from cnnjax.train.state import init_variables
from experiments.configs.base import base_config


def test_seed_002_resnet50_feature_extraction_counts():
    model = models.create("resnet50", num_classes=10)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    layout = transfer.stage_layout("resnet50", (64, 64, 3))
    assert layout.head == ("fc",) and layout.stages[:3] == ("conv1", "bn1", "layer1_0")
    labels = transfer.param_labels(params, transfer.frozen_stages(layout, "feature_extraction"), layout.head)
    assert transfer.count_params(params, labels) == (20_490, 23_528_522)
    labels = transfer.param_labels(params, transfer.frozen_stages(layout, "finetune", "layer4"), layout.head)
    trainable, total = transfer.count_params(params, labels)
    assert total == 23_528_522 and 20_490 < trainable < total


def test_stage_layout_follows_call_order_and_finds_the_head():
    vgg = transfer.stage_layout("vgg11", (32, 32, 3))
    assert vgg.head == ("classifier_6",) and vgg.stages[0] == "features_0" and vgg.stages[-1] == "classifier_3"
    assert transfer.frozen_stages(vgg, "finetune", "classifier_0") == vgg.stages[:-2]
    assert transfer.frozen_stages(vgg, "finetune", "stem") == ()
    assert transfer.frozen_stages(vgg, "scratch") == ()


def test_frozen_stages_rejects_bad_names():
    layout = transfer.stage_layout("resnet18", (32, 32, 3))
    with pytest.raises(ValueError, match="transfer mode must be one of"):
        transfer.frozen_stages(layout, "linear_probe")
    with pytest.raises(ValueError, match="unfreeze_from must be 'stem' or a stage .*conv1, bn1, layer1_0"):
        transfer.frozen_stages(layout, "finetune", "layer5")
    assert transfer.frozen_stages(layout, "finetune", "layer4")[-1] == "layer3_1"


def _dataset(n=32, classes=3):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (n, 32, 32, 3)).astype(np.uint8)
    labels = (np.arange(n) % classes).astype(np.int32)
    return Dataset("cifar10", images, labels, images[:8], labels[:8], tuple(str(i) for i in range(classes)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A resnet18 checkpoint with non-trivial BN statistics (5 classes), as a training run writes it."""
    model = models.create("resnet18", num_classes=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    variables = init_variables(model, (32, 32, 3), jax.random.PRNGKey(0), train=False)
    _, updates = jax.jit(lambda v: model.apply(v, x * 3 + 1, train=True, mutable=["batch_stats"]))(variables)
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    path = str(tmp_path_factory.mktemp("pretrained"))
    checkpoint.save(path, 0, variables, {"epoch": 0})
    return path, jax.device_get(variables)


def _train(pretrained_dir, mode, unfreeze_from="stem", steps=3):
    config = base_config()
    config.model.name = "resnet18"
    config.num_classes = 3
    config.data.name = "cifar10"
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.transfer.init_from = pretrained_dir
    config.transfer.mode = mode
    config.transfer.unfreeze_from = unfreeze_from
    config.transfer.backbone_lr = 0.01
    ds = _dataset()
    model, spec, state, _ = build(config, ds, steps_per_epoch=4)
    start = jax.device_get(state)
    runner = Runner(spec, model.apply)
    images, labels = runner.put_data(ds.train_images, ds.train_labels)
    state, _ = runner.train(runner.put_state(state), images, labels, np.arange(24).reshape(steps, 8))
    return start, runner.get_state(state)


def _moved(a, b) -> bool:
    """Whether some leaf of ``b`` differs from ``a``'s (the trees have one structure)."""
    return not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_feature_extraction_freezes_backbone_and_bn(pretrained):
    path, source = pretrained
    start, end = _train(path, "feature_extraction")
    backbone = lambda tree: {k: v for k, v in tree.items() if k != "fc"}  # noqa: E731
    chex.assert_trees_all_equal(backbone(start.params), backbone(source["params"]))  # transplanted
    chex.assert_trees_all_equal(backbone(end.params), backbone(source["params"]))
    chex.assert_trees_all_equal(end.batch_stats, source["batch_stats"])
    assert _moved(end.params["fc"], start.params["fc"])
    chex.assert_shape([end.params["fc"]["kernel"], end.params["fc"]["bias"]], [(512, 3), (3,)])


def test_finetune_moves_backbone_and_bn(pretrained):
    path, source = pretrained
    _, end = _train(path, "finetune", "stem")
    assert _moved(end.params["conv1"], source["params"]["conv1"])
    assert _moved(end.params["layer4_1"], source["params"]["layer4_1"])
    assert _moved(end.batch_stats["bn1"], source["batch_stats"]["bn1"])


def test_finetune_from_layer4_keeps_earlier_stages(pretrained):
    path, source = pretrained
    _, end = _train(path, "finetune", "layer4")
    for name in ("conv1", "bn1", "layer1_0", "layer3_1"):
        chex.assert_trees_all_equal(end.params[name], source["params"][name], custom_message=name)
    chex.assert_trees_all_equal(end.batch_stats["layer3_1"], source["batch_stats"]["layer3_1"])
    assert _moved(end.params["layer4_0"], source["params"]["layer4_0"])
    assert _moved(end.batch_stats["layer4_0"], source["batch_stats"]["layer4_0"])


def test_transfer_needs_init_from(pretrained):
    config = base_config()
    config.model.name = "resnet18"
    config.num_classes = 3
    config.data.name = "cifar10"
    config.transfer.mode = "feature_extraction"
    with pytest.raises(ValueError, match="needs `transfer.init_from`") as err:
        build(config, _dataset(), 4)
    from experiments.cli import as_flags

    assert "needs --config.transfer.init_from=CHECKPOINT_DIR" in as_flags(str(err.value))


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="apt-get install dataset-fashion-mnist")
def test_transfer_study_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "experiments.transfer", "--workdir", str(tmp_path), "--ks", "10",
                          "--pretrain_per_class", "20", "--pretrain_epochs", "1", "--target_steps", "2"],
                         capture_output=True, text=True, timeout=900,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    assert {r["mode"] for r in results["runs"]} == {"scratch", "feature_extraction", "finetune"}
    assert "| 10 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "transfer_vs_k.png").read_bytes()[:4] == b"\x89PNG"
