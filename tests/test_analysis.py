"""Analysis functions: formulas, receptive field (recurrence == measured), summary and its CLI."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from cnnjax import layers, models
from cnnjax.analysis import conv_output_size, conv_params, measured_receptive_field, receptive_field, summary
from cnnjax.train.state import init_variables


class ThreeConvs(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        for i in range(3):
            x = nn.relu(layers.Conv(4, 3, padding=1, name=f"conv{i}")(x))
        return x


def test_receptive_field_recurrence():
    assert receptive_field([(3, 1)] * 3) == (7, 7)
    assert receptive_field([(3, 1, 2)]) == (5, 5)  # dilation 2
    assert receptive_field([(7, 2), (3, 2)]) == (11, 11)  # resnet stem + max-pool
    assert receptive_field([]) == (1, 1)


def test_three_3x3_convs_recurrence_and_measurement_agree_on_7():
    model = ThreeConvs()
    variables = init_variables(model, (21, 21, 1), jax.random.PRNGKey(0))
    assert summary(model, (21, 21, 1)).receptive_field() == (7, 7)
    assert measured_receptive_field(model, variables, (21, 21, 1)) == (7, 7)


@pytest.mark.parametrize(
    "name,shape",
    [("tiny_cnn", (8, 8, 1)), ("simple_cnn", (32, 32, 3)), ("gap_cnn", (48, 48, 3)), ("lenet5", (32, 32, 1)),
     ("improved_cnn", (32, 32, 3)), ("cifar_resnet20", (160, 160, 3))],
)
def test_model_receptive_field_recurrence_matches_measurement(name, shape):
    model = models.create(name)
    variables = init_variables(model, shape, jax.random.PRNGKey(0), train=False)
    table = summary(model, shape)
    want = table.receptive_field()
    last = [r.name for r in table.rows if r.receptive_field is not None][-1]
    assert measured_receptive_field(model, variables, shape, layer=last) == want


def test_every_spatial_row_receptive_field_is_measured_exactly():
    model = models.create("simple_cnn")
    variables = init_variables(model, (32, 32, 3), jax.random.PRNGKey(0), train=False)
    for row in summary(model, (32, 32, 3)).rows:
        if row.receptive_field is not None:
            assert measured_receptive_field(model, variables, (32, 32, 3), layer=row.name) == row.receptive_field


def test_known_resnet50_receptive_field():
    assert summary(models.create("resnet50"), (224, 224, 3)).receptive_field() == (427, 427)


def test_formula_errors_are_clear():
    with pytest.raises(ValueError, match="too small"):
        conv_output_size(2, 5, 0, 1)
    with pytest.raises(ValueError, match="stride"):
        conv_output_size(8, 3, 0, 0)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        conv_params(3, 3, 4, 8, groups=3)
    assert conv_params(3, 3, 64, 64, bias=False) == 36_864
    assert conv_params(3, 3, 32, 32, groups=32) == 3 * 3 * 32 + 32


def test_summary_rows_sum_to_total():
    table = summary(models.create("resnet18"), (64, 64, 3))
    assert sum(r.params for r in table.rows) == table.total_params == 11_689_512
    assert table.output_shape == (1, 1000)
    shortcut = [r for r in table.rows if "downsample" in r.name]
    assert shortcut and all(r.receptive_field is None for r in shortcut)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cnnjax.summary", *args], capture_output=True, text=True,
                          timeout=300)


def test_summary_cli_resnet50():
    out = _cli("resnet50", "--input", "224,224,3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "Total params: 25,557,032"
    assert any(line.startswith("conv1 ") and "(1, 112, 112, 64)" in line and "9,408" in line for line in lines)


def test_summary_cli_bad_input_is_one_line_error():
    out = _cli("lenet5", "--input", "28,28,1")
    assert out.returncode == 2
    assert "conv1_padding=2" in out.stderr and "Traceback" not in out.stderr
    out = _cli("lenet5", "--input", "28,28")
    assert out.returncode == 2 and "--input must be H,W,C" in out.stderr
    assert _cli("lenet5", "--input", "28,28,1", "--kw", "conv1_padding=2").stdout.strip().endswith("61,706")
