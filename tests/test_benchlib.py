"""experiments.benchlib: each CPU variant of experiments.bench_cpu puts back exactly the library code it
does not have yet, and the code it puts back computes the same numbers; the ratios and tables the bench scripts
print; bench_ab's one-line refusal of a process variant."""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import conv, layers
from cnnjax.errors import UsageError
from cnnjax.models import lenet
from experiments import benchlib

GREY_CONV = ((28, 28), (3, 3), (1, 1), ((1, 1), (1, 1)))


@pytest.fixture
def library_restored(monkeypatch):
    """Every library switch a bench variant may change (benchlib._undo_changes), put back after the test."""
    for module, name in benchlib.library_switches():
        monkeypatch.setattr(module, name, getattr(module, name))


@pytest.mark.parametrize("variant,grey_impl,pool,closed_form_bn,lenet_pad,overlapping_views", [
    ("+im2col", "xla", "reduce_window", False, 0, False),
    ("+tiled max-pool", "xla", "reshape", False, 0, False),
    ("+greyscale im2col", "im2col", "reshape", False, 0, False),
    ("+strided-view max-pool", "im2col", "strided", False, 0, False),
    ("+closed-form BatchNorm backward", "im2col", "strided", True, 0, False),
    ("+shifted-sum greyscale conv", "shifted", "strided", True, 0, False),
    ("+8-channel LeNet", "shifted", "strided", True, 2, False),
    ("+overlapping strided-view max-pool", "shifted", "strided", True, 2, True),
])
def test_cpu_variant_puts_back_what_it_does_not_have(library_restored, variant, grey_impl, pool, closed_form_bn,
                                                      lenet_pad, overlapping_views):
    strided, overlapping = layers._tiled_max_pool, layers._overlapping_max_pool
    closed_form = layers._batch_norm_train
    benchlib._undo_changes(variant)
    assert conv.choose_impl(*GREY_CONV, backend="cpu", in_channels=1, out_channels=16) == grey_impl
    grey_5x5 = conv.choose_impl((32, 32), (5, 5), (1, 1), ((0, 0), (0, 0)), backend="cpu", in_channels=1,
                                out_channels=8)
    assert grey_5x5 == ("shifted" if grey_impl == "shifted" else "xla")
    assert conv.choose_impl((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), backend="cpu") == "im2col"  # earlier rule kept
    narrow_strided = conv.choose_impl((32, 32), (3, 3), (2, 2), ((1, 1), (1, 1)), backend="cpu", in_channels=16,
                                      out_channels=32)
    assert narrow_strided == "im2col"  # 'split' came later
    in_place = layers._tiled_max_pool
    assert (in_place is strided) == (pool == "strided")
    assert (in_place is benchlib._reshape_max_pool) == (pool == "reshape")
    assert layers._batch_norm_train is not closed_form  # the x_hat backward, or autodiff before it
    assert (layers._batch_norm_train is benchlib.autodiff_batch_norm_train) == (not closed_form_bn)
    assert lenet.CPU_CHANNEL_PAD == lenet_pad
    assert (layers._overlapping_max_pool is overlapping) == overlapping_views
    assert layers.TILED_POOL_BROADCAST_BACKWARD is False
    assert conv.USE_ONEDNN_ON_CPU is False and layers.USE_ONEDNN_POOL_ON_CPU is False


@pytest.mark.parametrize("window", [2, 3])
def test_the_earlier_reshape_max_pool_gives_the_same_values_and_gradients(window):
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (2, 4 * window, 5 * window, 3)))  # ties at 0
    grads = [jax.grad(lambda v, f=f: (f(v, window, window) ** 2 * jnp.arange(3.0)).sum())(x)
             for f in (layers._tiled_max_pool, benchlib._reshape_max_pool)]
    np.testing.assert_array_equal(layers._tiled_max_pool(x, window, window),
                                  benchlib._reshape_max_pool(x, window, window))
    np.testing.assert_array_equal(*grads)


def test_the_earlier_overlapping_max_pool_gives_the_same_values_and_gradients(library_restored):
    """The ``reduce_window`` pool that variants before ``+overlapping strided-view max-pool`` put back."""
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 15, 3)))  # ties at 0
    pools = [layers._overlapping_max_pool]
    benchlib._undo_changes("+8-channel LeNet")
    pools.append(layers._overlapping_max_pool)
    assert pools[0] is not pools[1]
    got = [jax.value_and_grad(lambda v, f=f: (f(v, (3, 3), (2, 2), (1, 1)) ** 2 * jnp.arange(3.0)).sum())(x)
           for f in pools]
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


@pytest.mark.parametrize("stats", [False, True])
def test_the_earlier_x_hat_batch_norm_gives_the_same_values_and_gradients(library_restored, stats):
    """What variants before ``+BatchNorm backward without x_hat`` put back computes what the library does."""
    current = layers._batch_norm_train
    benchlib._undo_changes("+two oneDNN slices")
    assert layers._batch_norm_train is current  # from +BatchNorm backward without x_hat on, the library's own
    benchlib._undo_changes("+oneDNN on XLA's threads")
    assert layers._batch_norm_train is not current
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 6)) * 3 + 1
    g = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias, 1e-5, None)
        return jnp.sum(y * g) + (jnp.sum(mean * jnp.arange(6.0)) + jnp.sum(var * var) if stats else 0.0)

    args = (x, jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6))
    got = [jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2))(*args)
           for fn in (current, benchlib.xhat_batch_norm_train())]
    np.testing.assert_allclose(got[0][0], got[1][0], rtol=1e-6)
    for a, b in zip(got[0][1], got[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_with_variant_puts_the_library_back_on_exit(library_restored):
    before = (conv.choose_impl, layers._tiled_max_pool, layers._overlapping_max_pool, layers._batch_norm_train,
              lenet.CPU_CHANNEL_PAD)
    with benchlib.with_variant("+tiled max-pool"):
        assert layers._tiled_max_pool is benchlib._reshape_max_pool
        assert layers._batch_norm_train is benchlib.autodiff_batch_norm_train
        assert conv.choose_impl(*GREY_CONV, backend="cpu", in_channels=1, out_channels=16) == "xla"
        assert lenet.CPU_CHANNEL_PAD == 0
        assert layers._overlapping_max_pool is not before[2]
    assert (conv.choose_impl, layers._tiled_max_pool, layers._overlapping_max_pool, layers._batch_norm_train,
            lenet.CPU_CHANNEL_PAD) == before


@pytest.mark.parametrize("variant,ynn_flag,huge,tcmalloc,xla_threads", [
    ("baseline", False, 0, False, False), ("+ynn flag", True, 0, False, False),
    ("+overlapping strided-view max-pool", True, 0, False, False), ("+huge pages", True, 1, False, False),
    ("+oneDNN max-pool", True, 1, False, False), ("+tcmalloc", True, 1, True, False),
    ("+oneDNN greyscale gradients", True, 1, True, False), ("+oneDNN on XLA's threads", True, 1, True, True),
    ("+BatchNorm backward without x_hat", True, 1, True, True), ("+two oneDNN slices", True, 1, True, True)])
def test_bench_cpu_gives_each_variant_its_process_settings(variant, ynn_flag, huge, tcmalloc, xla_threads):
    from cnnjax.native import onednn
    from experiments import cli

    tcm = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
               "LD_PRELOAD": f"/opt/libfoo.so:{tcm}", onednn.THREADS_CHOICE: "omp"}
    env = benchlib.variant_env(variant, environ, tcm)
    assert env.get(onednn.THREADS_CHOICE) == (None if xla_threads else "omp")
    assert env[onednn.SLICES_CHOICE] == ("2" if variant == "+two oneDNN slices" else "4")
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x"] + ([cli.CPU_XLA_FLAG] if ynn_flag else [])
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb={huge}"
    assert env["LD_PRELOAD"] == ("/opt/libfoo.so:" + tcm if tcmalloc else "/opt/libfoo.so")
    assert env.get(cli.MALLOC_CHOICE) == (None if tcmalloc else "glibc")
    # the settings the variant's process then runs with: an entry point would add nothing to them
    assert cli.tcmalloc_preload(env, tcm) is None


def test_the_tcmalloc_variant_without_tcmalloc_is_one_line():
    with pytest.raises(UsageError, match="libtcmalloc-minimal4"):
        benchlib.variant_env("+tcmalloc", {}, None)


@pytest.mark.parametrize("variant,want", [("+huge pages", "im2col"), ("+kept conv input", "im2col"),
                                          ("+split strided conv", "split")])
def test_split_strided_conv_variant(variant, want):
    pick = conv.choose_impl
    with benchlib.with_variant(variant):
        assert conv.choose_impl((32, 32), (3, 3), (2, 2), ((1, 1), (1, 1)), backend="cpu", in_channels=16,
                                out_channels=32) == want
    assert conv.choose_impl is pick


@pytest.mark.parametrize("variant,broadcast", [("+split strided conv", False),
                                               ("+broadcast tiled max-pool backward", True)])
def test_broadcast_tiled_max_pool_backward_variant(variant, broadcast):
    with benchlib.with_variant(variant):
        assert layers.TILED_POOL_BROADCAST_BACKWARD is broadcast
    assert layers.TILED_POOL_BROADCAST_BACKWARD is True


@pytest.mark.parametrize("variant,convs,pools,pools_need_avx512", [
    ("+broadcast tiled max-pool backward", False, False, False), ("+oneDNN convolutions", True, False, False),
    ("+oneDNN max-pool", True, True, False), ("+two oneDNN slices", True, True, False),
    ("+oneDNN max-pool with AVX-512 only", True, True, True)])
def test_onednn_variants(variant, convs, pools, pools_need_avx512):
    with benchlib.with_variant(variant):
        assert (conv.USE_ONEDNN_ON_CPU, layers.USE_ONEDNN_POOL_ON_CPU, layers.ONEDNN_POOL_NEEDS_AVX512) == (
            convs, pools, pools_need_avx512)
    assert conv.USE_ONEDNN_ON_CPU is True and layers.USE_ONEDNN_POOL_ON_CPU is True
    assert layers.ONEDNN_POOL_NEEDS_AVX512 is True


@pytest.mark.parametrize("variant,by_shape,forward_as_input_gradient", [
    ("+oneDNN max-pool with AVX-512 only", False, False), ("+float32 kernel-gradient paths by shape", True, False),
    ("+float32 forwards as input gradients", True, True)])
def test_float32_oneDNN_path_variants(variant, by_shape, forward_as_input_gradient):
    with benchlib.with_variant(variant):
        assert (conv.ONEDNN_F32_WGRAD_BY_SHAPE, conv.ONEDNN_F32_FORWARD_AS_INPUT_GRAD) == (by_shape,
                                                                                          forward_as_input_gradient)
    assert conv.ONEDNN_F32_WGRAD_BY_SHAPE is True and conv.ONEDNN_F32_FORWARD_AS_INPUT_GRAD is True


@pytest.mark.parametrize("variant,kept", [("+huge pages", False), ("+kept conv input", True)])
def test_kept_conv_input_variant(library_restored, variant, kept):
    with benchlib.with_variant(variant):
        assert conv.KEEP_CONV_INPUT_ON_CPU is kept
    assert conv.KEEP_CONV_INPUT_ON_CPU is True


def test_bench_cpu_tables_give_medians_fastest_rounds_and_the_geometric_mean():
    runs = {"+kept conv input": [{"a": 100.0, "b": 10.0}, {"a": 50.0, "b": 30.0}, {"a": 80.0, "b": 20.0}],
            "torch eager": [{"a": 100.0, "b": 20.0}, {"a": 100.0, "b": 20.0}, {"a": 100.0, "b": 20.0}]}
    median = benchlib.summarise(runs, ["a", "b"], statistics.median)
    fastest = benchlib.summarise(runs, ["a", "b"], max)
    assert median["+kept conv input"] == {"a": 80.0, "b": 20.0}
    assert fastest["+kept conv input"] == {"a": 100.0, "b": 30.0}
    table = benchlib.variants_markdown(fastest, ["a", "b"], 128, 3, "fastest")
    assert "fastest of 3" in table
    assert "| b | 30 (1.50x) | 20 |" in table
    assert "| geometric mean | 1.22x | |" in table  # sqrt(1.0 * 1.5)


def test_paired_ratios_median_of_rounds_and_fastest_rounds():
    # Round 2 hit a slow spell on A only; round 3 on B only.
    a_runs, b_runs = [100.0, 60.0, 100.0], [110.0, 108.0, 70.0]
    median, fastest = benchlib.paired_ratios(a_runs, b_runs)
    assert median == pytest.approx(1.1)        # ratios 1.1, 1.8, 0.7
    assert fastest == pytest.approx(110 / 100)


@pytest.mark.parametrize("a_runs,b_runs", [([1.0], [1.0, 2.0]), ([], [])])
def test_paired_ratios_need_equal_nonempty_rounds(a_runs, b_runs):
    with pytest.raises(UsageError, match="same number of runs on each side"):
        benchlib.paired_ratios(a_runs, b_runs)


def test_a_process_variant_is_refused_in_one_line():
    out = subprocess.run([sys.executable, "-m", "experiments.bench_ab", "--a", "+kept conv input", "--b", "+huge pages",
                          "--models", "lenet5"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "setting of the whole process" in line]
    assert len(lines) == 1 and "experiments.bench_cpu" in lines[0]
    assert "Traceback" not in out.stderr


def test_model_convs_lists_each_distinct_conv_of_a_bench_model_with_its_calls():
    convs = benchlib.model_convs("cifar_resnet20")
    got = [(c["input"], c["module"].features, c["module"].stride, c["count"], c["first"]) for c in convs]
    assert got == [((32, 32, 3), 16, 1, 1, True), ((32, 32, 16), 16, 1, 6, False), ((32, 32, 16), 32, 2, 1, False),
                   ((16, 16, 32), 32, 1, 5, False), ((16, 16, 32), 64, 2, 1, False), ((8, 8, 64), 64, 1, 5, False)]
    # LeNet-5's CPU layout: conv1 writes 2 zero channels, which conv2 reads as 6 (what torch's twin has).
    first, second = benchlib.model_convs("lenet5")
    assert (first["module"].pad_features, second["input"], second["module"].in_features) == (2, (14, 14, 8), 6)


def test_conv_vs_torch_rows_time_every_conv_and_sum_them_per_step():
    pytest.importorskip("torch")
    rows = benchlib.conv_vs_torch_rows("cifar_resnet20", batch=2, steps=1)
    convs = benchlib.model_convs("cifar_resnet20")
    assert len(rows) == len(convs) + 1 and rows[-1].startswith("| **per train step** |")
    cells = [[float(v) for v in row.strip("|").split("|")[1:]] for row in rows[:-1]]
    assert [int(c[0]) for c in cells] == [c["count"] for c in convs]
    assert all(v > 0 for c in cells for v in c)
    totals = [float(v.strip(" *")) for v in rows[-1].strip("|").split("|")[2:]]
    want = [sum(c[0] * c[i] for c in cells) for i in range(1, 5)]
    np.testing.assert_allclose(totals[:4], want, rtol=0.01, atol=0.06)
    # The ratio is of the unrounded totals, printed to 0.1: it lies where those roundings allow (plus its own 0.005).
    (ours, theirs), half = (totals[1], totals[3]), 0.05
    assert (theirs - half) / (ours + half) - 0.005 <= totals[4] <= (theirs + half) / max(ours - half, 1e-9) + 0.005


# --- the bench's torch side: device and precision ---------------------------------------------------------


def test_torch_device_follows_the_gpu_torch_sees_and_refuses_cuda_without_one(monkeypatch):
    torch = pytest.importorskip("torch")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchlib.torch_device("auto") == "cpu" and benchlib.torch_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="sees no GPU; install a CUDA build of torch or pass --torch_device=cpu"):
        benchlib.torch_device("cuda")
    with pytest.raises(UsageError, match="--torch_device must be one of auto, cpu, cuda; got 'tpu'"):
        benchlib.torch_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchlib.torch_device("auto") == "cuda" and benchlib.torch_device("cpu") == "cpu"


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_torch_twin_steps_compute_in_the_precision_asked_and_keep_float32_parameters(precision, dtype):
    torch = pytest.importorskip("torch")

    twin = benchlib.torch_steps("lenet5", (32, 32, 1), 4, "cpu", precision)
    seen = []
    first_conv = next(m for m in twin["model"].modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = first_conv.weight.detach().clone()
    loss = twin["train_step"]()
    assert seen == [getattr(torch, dtype)] and torch.isfinite(loss) and loss.dtype == torch.float32
    assert first_conv.weight.dtype == torch.float32 and not torch.equal(first_conv.weight, before)  # it stepped
    assert twin["eval_step"]().dtype == getattr(torch, dtype) and twin["sync"] is None


def test_bench_torch_sides_keeps_the_eager_figures_when_compile_fails_and_times_only_compiled_training(
        monkeypatch):
    calls = []

    def fake_bench_torch(name, shape, batch, steps, compiled, device, precision, warmup, modes=("train", "eval")):
        calls.append((compiled, modes))
        if compiled:
            raise RuntimeError("inductor needs a C++ compiler\nmore detail")
        return {"train_img_s": 1.0, "eval_img_s": 2.0}

    monkeypatch.setattr(benchlib, "bench_torch", fake_bench_torch)
    out = benchlib.bench_torch_sides("lenet5", (32, 32, 1), 4, 5, True, "cpu", "fp32", 1)
    assert out == {"torch_eager": {"train_img_s": 1.0, "eval_img_s": 2.0},
                   "torch_compile": {"error": "inductor needs a C++ compiler"}}
    assert calls == [(False, ("train", "eval")), (True, ("train",))]
    assert set(benchlib.bench_torch_sides("lenet5", (32, 32, 1), 4, 5, False, "cpu", "fp32", 1)) == {"torch_eager"}


def test_bench_torch_times_only_the_modes_asked(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = {"train": 0, "eval": 0}
    twin = {"model": torch.nn.Linear(1, 1), "sync": None,
            "train_step": lambda: calls.__setitem__("train", calls["train"] + 1),
            "eval_step": lambda: calls.__setitem__("eval", calls["eval"] + 1)}
    monkeypatch.setattr(benchlib, "torch_steps", lambda *a, **k: twin)
    out = benchlib.bench_torch("lenet5", (32, 32, 1), batch=2, steps=5, compiled=False, warmup=1, modes=("train",))
    assert calls == {"train": 1 + 1 + 5, "eval": 0} and set(out) == {"train_img_s", "compile_s"}


def test_bench_spec_precision_sets_the_compute_dtype():
    assert benchlib.bench_spec((32, 32, 3)).compute_dtype == jnp.float32
    assert benchlib.bench_spec((32, 32, 3), "bf16").compute_dtype == jnp.bfloat16
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16; got 'fp16'"):
        benchlib.bench_spec((32, 32, 3), "fp16")


def test_bench_gives_a_row_per_model_and_precision_with_both_sides_timed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--models", "lenet5",
                           "--precisions", "fp32,bf16", "--steps", "1", "--notorch_compile", "--nopipeline",
                           "--nodata_modes", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["model"], r["precision"]) for r in result["rows"]] == [("lenet5", "fp32"), ("lenet5", "bf16")]
    assert all(r[side]["train_img_s"] > 0 for r in result["rows"] for side in ("jax", "torch_eager"))
    assert result["meta"]["torch_device"] == "cpu" and result["pipeline"] is None and result["complete"]
    assert "| lenet5 | 32x32x1 | 128 | bf16 |" in done.stdout and "torch on cpu" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "experiments.bench", "--precisions", "fp16", "--notorch"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown bench row or "
                                                                                 "precision 'fp16'")
    bad = subprocess.run([sys.executable, "-m", "experiments.bench", "--batches", "128,big", "--notorch"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: --batches must list positive batch sizes, e.g. 128,512; got '128,big'")


def test_bench_stopped_by_a_signal_says_where_the_rows_finished_so_far_are(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.bench", "--quick", "--models", "lenet5,fast_cnn",
                             "--notorch", "--nopipeline", "--nodata_modes", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (f'interrupted by signal 15 with the rows finished so far in {out} '
                                               '("complete": false); run the same command again')
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["rows"]] == ["lenet5"] and saved["complete"] is False


def test_bench_render_prints_the_saved_rows_of_several_files_and_refuses_others(tmp_path):
    # In a process of its own: experiments.bench defines absl flags that other entry points' modules define too.
    meta = {"machine": "x86_64, 16 cores", "device": "cuda:0", "torch_device": "NVIDIA H200", "jax": "0.11.2",
            "torch": "2.11.0", "date": "2026-12-04", "xla_flags": ""}
    jax_side = {"train_img_s": 300.0, "eval_img_s": 900.0, "compile_s": 4.0}
    rows = [{"model": m, "input": "32x32x3", "batch": 128, "precision": p, "jax": jax_side,
             "torch_eager": {"train_img_s": 100.0, "eval_img_s": 400.0}, "torch_compile": {"train_img_s": 150.0}}
            for m, p in (("fast_cnn", "fp32"), ("cifar_resnet20", "bf16"))]
    first, second, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(json.dumps({"meta": meta, "rows": rows[:1], "complete": False}))
    second.write_text(json.dumps({"meta": meta, "rows": rows[1:], "complete": True}))
    other.write_text(json.dumps({"rows": []}))

    def render(*paths):
        return subprocess.run([sys.executable, "-m", "experiments.bench", "--render", ",".join(map(str, paths))],
                              capture_output=True, text=True, timeout=120)

    table = render(first, second).stdout.strip()
    assert table.splitlines()[0].startswith("Machine: x86_64, 16 cores (cnnjax on cuda:0, torch on NVIDIA H200)")
    assert "| fast_cnn | 32x32x3 | 128 | fp32 | 300 | 100 | 150 | 3.00 | 900 | 400 | 4.0 |" in table
    assert table.splitlines()[-1].startswith("| cifar_resnet20 | 32x32x3 | 128 | bf16 | 300 |")
    for paths, want in (((first, other), "c.json is not a bench result"),
                        ((tmp_path / "missing.json",), "--render: ")):
        bad = render(*paths)
        assert bad.returncode == 2 and want in bad.stderr.strip().splitlines()[-1], bad.stderr[-500:]


# --- PyTorch in a process of its own -----------------------------------------------------------------------


def test_in_fresh_process_runs_the_function_elsewhere_with_its_arguments_and_environment():
    import math
    import os

    assert benchlib.in_fresh_process(math.hypot, 3, 4) == 5.0
    assert benchlib.in_fresh_process(os.getpid) != os.getpid()
    env = {**os.environ, "CNNJAX_PROBE": "from the parent"}
    assert benchlib.in_fresh_process(os.getenv, "CNNJAX_PROBE", env=env) == "from the parent"
    assert benchlib.in_fresh_process(os.getenv, "CNNJAX_PROBE") is None


def test_in_fresh_process_reports_the_childs_error_in_one_line():
    import math

    with pytest.raises(RuntimeError, match=r"^sqrt failed in its own process \(exit 1\): ValueError: math domain"):
        benchlib.in_fresh_process(math.sqrt, -1.0)


def test_in_fresh_process_child_ends_when_its_parent_is_killed():
    """A parent stopped by a signal to its own id (not its process group) leaves no child running on."""
    script = ("import time; from experiments.benchlib import in_fresh_process; "
              "in_fresh_process(time.sleep, 120)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    child = None
    try:
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
                pids = f.read().split()
            child = int(pids[0]) if pids else None
            time.sleep(0.1)
        assert child is not None, "the parent started no child"
        time.sleep(1.0)  # the child past its first lines, which arm PR_SET_PDEATHSIG
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child)
    finally:
        parent.kill()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- untimed warm-up steps, the same on both sides -----------------------------------------------------------


class _CountingRunner:
    """Stands in for a Runner: counts train calls and their sizes."""

    def __init__(self):
        self.calls = []

    def train(self, state, images, labels, idx):
        self.calls.append(idx.shape)
        return state, jnp.zeros(())


@pytest.mark.parametrize("warmup,chunk,want_calls", [(1, 1, 1 + 1 + 5), (10, 1, 1 + 10 + 5), (4, 2, 1 + 2 + 2)])
def test_time_jax_training_times_only_the_steps_after_compile_and_warm_up(monkeypatch, warmup, chunk, want_calls):
    runner = _CountingRunner()
    monkeypatch.setattr(benchlib, "prepared_runner", lambda *a, **k: (runner, None, None, None))
    out = benchlib.time_jax_training(None, None, (4, 4, 1), batch=3, steps=5, chunk=chunk, warmup=warmup)
    assert len(runner.calls) == want_calls and set(runner.calls) == {(chunk, 3)}
    assert out["train_img_s"] > 0


def test_bench_torch_warms_each_mode_up_before_timing(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = {"train": 0, "eval": 0}
    model = torch.nn.Linear(1, 1)
    twin = {"model": model, "sync": None,
            "train_step": lambda: calls.__setitem__("train", calls["train"] + 1),
            "eval_step": lambda: calls.__setitem__("eval", calls["eval"] + 1)}
    monkeypatch.setattr(benchlib, "torch_steps", lambda *a, **k: twin)
    out = benchlib.bench_torch("lenet5", (32, 32, 1), batch=2, steps=5, compiled=False, warmup=7)
    assert calls == {"train": 1 + 7 + 5, "eval": 1 + 7 + 5}
    assert out["train_img_s"] > 0 and out["eval_img_s"] > 0
