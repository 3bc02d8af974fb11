"""experiments.bench.profile: every op of a train step lands in the kind its module and role say."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from cnnjax.cpu import onednn
from cnnjax.layers import BatchNorm, Conv, MaxPool
from cnnjax.train.state import create_train_state
from cnnjax.train.steps import StepSpec, train_step
from experiments.bench import profile as profilelib
from experiments.bench.profile import op_kind, time_jaxpr_ops


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(4, 3, padding=1, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train=train))
        x = Conv(4, 3, padding=1, name="conv2")(x)  # its input gradient is needed (conv1's is not)
        x = MaxPool(2, name="pool")(x)
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def test_op_kinds_of_a_train_step_cover_conv_roles_bn_pool_dense_and_optimizer():
    model = _Net()
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), (8, 8, 1), jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (4, 8, 8, 1)).astype(np.uint8)
    labels = rng.randint(0, 3, 4).astype(np.int32)
    spec = StepSpec(3, (0.5,), (0.25,))
    ms = time_jaxpr_ops(lambda s, x, y: train_step(s, x, y, spec), (state, images, labels), batch=4, reps=1)
    for kind in ("conv forward", "conv input-gradient", "conv weight-gradient", "BatchNorm", "pooling", "dense",
                 "optimizer update", "input preparation", "loss"):
        assert ms.get(kind, 0.0) > 0, (kind, ms)


def test_op_kind_rules():
    assert op_kind("conv_general_dilated", "jvp(Net)/conv1", (4, 8, 8, 4), 4) == "conv forward"
    assert op_kind("conv_general_dilated", "transpose(jvp(Net))/conv1", (4, 8, 8, 1), 4) == "conv input-gradient"
    assert op_kind("conv_general_dilated", "transpose(jvp(Net))/conv1", (3, 3, 1, 4), 4) == "conv weight-gradient"
    assert op_kind("dot_general", "transpose(jvp(Net))/layer1_0/conv2", (9, 4), 4) == "conv weight-gradient"
    assert op_kind("ffi_call", "transpose(jvp(Net))/conv2", (4, 8, 8, 4), 4) == "conv input-gradient"  # oneDNN
    assert op_kind("ffi_call", "transpose(jvp(Net))/conv2", (3, 3, 4, 4), 4) == "conv weight-gradient"
    assert op_kind("ffi_call", "jvp(Net)/conv2", (4, 8, 8, 4), 4) == "conv forward"
    assert op_kind("custom_vjp_call", "jvp(Net)/conv2", (4, 8, 8, 4), 4) == "conv forward"  # oneDNN's forward
    assert op_kind("custom_vjp_call", "jvp(Net)/layer1_0/bn1", (4, 8, 8, 4), 4) == "BatchNorm"
    assert op_kind("custom_vjp_call", "jvp(Net)/pool", (4, 4, 4, 4), 4) == "pooling"
    assert op_kind("mul", "transpose(jvp(Net))/layer1_0/bn2", (4, 8, 8, 4), 4) == "BatchNorm"
    assert op_kind("transpose", "jvp(Net)", (4, 4), 4) == "layout transposes / copies"
    assert op_kind("add", "optimizer", (4,), 4) == "optimizer update"
    assert op_kind("max", "jvp(Net)/relu", (4, 8, 8, 4), 4) == "other elementwise"


def test_hlo_instructions_and_thunk_kinds():
    hlo = """HloModule m

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %neg = f32[4]{0} negate(%param_0)
}

ENTRY %main (p: f32[4,8,8,1]) -> f32[4] {
  %conv_general_dilated.3 = f32[4,8,8,4]{3,2,1,0} convolution(%p, %k), window={size=3x3}, metadata={op_name="CONV"}
  %transpose_copy_fusion.2 = f32[4,8,8,4]{3,2,1,0} fusion(%conv_general_dilated.3), kind=kLoop, calls=%fused_computation
  %ynn_fusion.1 = f32[36,4]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="DOT"}
  %ffi_call.7 = f32[3,3,4,4]{3,2,1,0} custom-call(%x, %g), custom_call_target="T", metadata={op_name="FFI"}
  %multiply_add_fusion = f32[4]{0} fusion(%x), kind=kLoop, metadata={op_name="jit(run)/transpose(jvp(Net))/bn1/mul"}
  ROOT %add_fusion = f32[4]{0} fusion(%x), kind=kLoop, metadata={op_name="jit(run)/optimizer/add"}
}
"""
    found = profilelib.hlo_instructions(hlo.replace("CONV", "jit(run)/jvp(Net)/conv1/conv_general_dilated").replace(
        "DOT", "jit(run)/transpose(jvp(Net))/layer1_0/conv2/dot_general").replace(
        "FFI", "jit(run)/transpose(jvp(Net))/conv2/ffi_call"))
    assert "neg" not in found  # only the entry computation's instructions are thunks
    assert found["conv_general_dilated.3"] == ("convolution", "jit(run)/jvp(Net)/conv1/conv_general_dilated")
    kinds = {n: profilelib.thunk_kind(n, *v) for n, v in found.items()}
    assert kinds == {"conv_general_dilated.3": "convolutions (asynchronous: launch only)",
                     "transpose_copy_fusion.2": "layout transposes / copies",
                     "ynn_fusion.1": "conv as dots / patches", "ffi_call.7": "oneDNN convolutions",
                     "multiply_add_fusion": "BatchNorm",
                     "add_fusion": "optimizer update"}


def test_fused_profile_times_the_compiled_steps_thunks(tmp_path):
    result = profilelib.profile_fused("lenet5", batch=8, steps=2, trace_dir=str(tmp_path))
    assert result["wall_ms"] > 0 and sum(result["ms"].values()) > 0
    kinds = set(result["kinds"].values())
    # lenet5's convs are all oneDNN's where its kernels are built (conv1's gradients too), else XLA's (asynchronous)
    convs = "oneDNN convolutions" if onednn.load().available else "convolutions (asynchronous: launch only)"
    assert {convs, "layout transposes / copies", "dense"} <= kinds, kinds
    assert set(result["kinds"]) == set(result["ms"]) == set(result["op_names"])


def test_fused_profile_of_the_bf16_recipe_row_sees_the_residual_groups(tmp_path):
    result = profilelib.profile_fused("fast_cnn@28+residual", batch=4, steps=1, trace_dir=str(tmp_path),
                                      precision="bf16")
    paths = " ".join(result["op_names"].values())
    assert "block3/conv3" in paths and "block3/norm3" in paths
    assert "BatchNorm" in set(result["kinds"].values())


def test_bf16_profile_needs_the_fused_step():
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "experiments.bench.profile", "--precision=bf16", "--models=lenet5"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                         env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--precision=bf16 profiles the fused step only: add --fused" in out.stderr


def test_conv_gflop_counts_each_computed_gradient_of_the_twins_convs():
    # simple_cnn@28 at batch 2: conv1 1->16 on 28x28, conv2 16->32 on 14x14, 3x3 kernels; conv1's input is the data
    conv1, conv2 = 2 * 2 * 28 * 28 * 16 * 1 * 9 / 1e9, 2 * 2 * 14 * 14 * 32 * 16 * 9 / 1e9
    gflop = profilelib.conv_gflop("simple_cnn@28", batch=2)
    assert gflop["conv forward"] == pytest.approx(conv1 + conv2)
    assert gflop["conv input-gradient"] == pytest.approx(conv2)
    assert gflop["conv weight-gradient"] == pytest.approx(conv1 + conv2)
    assert profilelib.conv_gflop("simple_cnn@28", batch=4)["conv forward"] == pytest.approx(2 * (conv1 + conv2))


def test_matmul_rates_are_measured_on_both_sides():
    for rate in (profilelib.jax_matmul_gflop_s(n=128, reps=2), profilelib.torch_matmul_gflop_s(n=128, reps=2)):
        assert 0.01 < rate < 1e5


def test_the_arithmetic_tables_divide_counted_gflop_by_each_sides_ms():
    gflop = {"conv forward": 3.0, "conv input-gradient": 2.0, "conv weight-gradient": 3.0}
    ours = {"ms": {"conv forward": 30.0, "conv input-gradient": 10.0, "conv weight-gradient": 40.0},
            "matmul_gflop_s": 120.4}
    theirs = {"ms": {"conv forward": 20.0, "conv input+weight gradient": 100.0}, "matmul_gflop_s": 131.6}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in profilelib.arithmetic_table(gflop, ours, theirs).splitlines() if line.startswith("| conv")}
    assert rows["conv forward"] == ["3.00", "100", "150 |"]
    assert rows["conv input-gradient"] == ["2.00", "200", "- |"]
    assert rows["conv weight-gradient"] == ["3.00", "75", "- |"]
    assert rows["conv input+weight gradient"] == ["5.00", "100", "50 |"]
    assert "XLA 120 GFLOP/s, torch (MKL) 132 GFLOP/s" in profilelib.arithmetic_table(gflop, ours, theirs)
    fused = {"kinds": {"ffi_call.1": "oneDNN convolutions", "fusion": "BatchNorm"},
             "ms": {"ffi_call.1": 80.0, "fusion": 5.0}, "matmul_gflop_s": 99.6}
    line = profilelib.fused_conv_rate(fused, gflop)
    assert "8.00 GFLOP per step" in line and "in 80.0 ms of oneDNN convolutions: 100 GFLOP/s" in line
    assert line.endswith("in this process: 100 GFLOP/s")
    fused["kinds"]["ffi_call.1"] = "convolutions (asynchronous: launch only)"
    assert "asynchronously" in profilelib.fused_conv_rate(fused, gflop)
