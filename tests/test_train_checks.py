"""Workdir identity (cnnjax.train.checks): what makes two configs the same experiment on resume."""

from __future__ import annotations

import json

import ml_collections

from cnnjax.train.checks import identity
from experiments.configs import cifar10_fast, fashion_mnist_30min


def _as_saved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as a resumed run reads it back from its workdir's config.json (tuples become lists)."""
    return ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))


def test_a_config_read_back_from_config_json_is_the_same_experiment():
    config = fashion_mnist_30min.get_config()
    config.model.kwargs.widths = (128, 384, 384)  # what --config.model.kwargs.widths="(128,384,384)" gives
    assert isinstance(config.model.kwargs.widths, tuple)
    assert identity(_as_saved(config)) == identity(config)


def test_model_kwargs_equal_to_the_models_defaults_do_not_change_the_experiment():
    given = cifar10_fast.get_config()
    left_out = cifar10_fast.get_config()
    left_out.model.kwargs = ml_collections.ConfigDict()  # a workdir started before the config named its widths
    assert given.model.kwargs.widths == (64, 256, 256)
    assert identity(given) == identity(left_out)


def test_other_model_kwargs_are_another_experiment():
    wide = cifar10_fast.get_config()
    wide.model.kwargs.widths = (128, 384, 384)
    other = identity(wide)
    assert other != identity(cifar10_fast.get_config())
    assert other["model.kwargs"] == {"widths": [128, 384, 384]}
