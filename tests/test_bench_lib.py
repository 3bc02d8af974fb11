"""experiments.bench: the shared library (each side in a process of its own, warm-up, the torch twins' steps), the
CPU table (experiments.bench.cpu), the per-conv table (experiments.bench.convs) and the throughput table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from cnnjax.errors import UsageError
from experiments.bench import convs, cpu
from experiments.bench import lib as benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THROUGHPUT = [sys.executable, "-m", "experiments.bench.throughput"]


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


@pytest.mark.slow  # the GPU table's command run end to end on the CPU, bfloat16 included
def test_bench_gives_a_row_per_model_and_precision_with_both_sides_timed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    done = subprocess.run([*THROUGHPUT, "--quick", "--models", "lenet5",
                           "--precisions", "fp32,bf16", "--steps", "1", "--notorch_compile", "--nopipeline",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["model"], r["precision"]) for r in result["rows"]] == [("lenet5", "fp32"), ("lenet5", "bf16")]
    assert all(r[side]["train_img_s"] > 0 for r in result["rows"] for side in ("jax", "torch_eager"))
    assert result["meta"]["torch_device"] == "cpu" and result["pipeline"] is None and result["complete"]
    assert "| lenet5 | 32x32x1 | 128 | bf16 |" in done.stdout and "torch on cpu" in done.stdout
    bad = subprocess.run([*THROUGHPUT, "--precisions", "fp16", "--notorch"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown bench row or "
                                                                                 "precision 'fp16'")
    bad = subprocess.run([*THROUGHPUT, "--batches", "128,big", "--notorch"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: --batches must list positive batch sizes, e.g. 128,512; got '128,big'")


def test_bench_stopped_by_a_signal_says_where_the_rows_finished_so_far_are(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([*THROUGHPUT, "--quick", "--models", "lenet5,fast_cnn",
                             "--notorch", "--nopipeline", "--out", str(out)],
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
        return subprocess.run([*THROUGHPUT, "--render", ",".join(map(str, paths))],
                              capture_output=True, text=True, timeout=120)

    table = render(first, second).stdout.strip()
    assert table.splitlines()[0].startswith("Machine: x86_64, 16 cores (cnnjax on cuda:0, torch on NVIDIA H200)")
    assert "| fast_cnn | 32x32x3 | 128 | fp32 | 300 | 100 | 150 | 3.00 | 900 | 400 | 4.0 |" in table
    assert table.splitlines()[-1].startswith("| cifar_resnet20 | 32x32x3 | 128 | bf16 | 300 |")
    for paths, want in (((first, other), "c.json is not a throughput result"),
                        ((tmp_path / "missing.json",), "--render: ")):
        bad = render(*paths)
        assert bad.returncode == 2 and want in bad.stderr.strip().splitlines()[-1], bad.stderr[-500:]


# --- the CPU table -------------------------------------------------------------------------------------------


def test_each_side_of_the_cpu_table_gets_its_environment():
    tcm = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    environ = {"CNNJAX_CPU_BACKEND": "0", "LD_PRELOAD": tcm, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
               "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}
    backend, xla, glibc = (cpu.side_env(side, environ) for side in ("backend", "xla", "glibc"))
    assert backend == {k: v for k, v in environ.items() if k != "CNNJAX_CPU_BACKEND"}  # on, whatever the caller had
    assert xla == {**backend, "CNNJAX_CPU_BACKEND": "0"}
    assert glibc == {"XLA_FLAGS": environ["XLA_FLAGS"], "CNNJAX_MALLOC": "glibc"}
    assert cpu.side_env("torch", environ) == backend


def test_the_cpu_table_gives_medians_ratios_and_their_geometric_means():
    rows = [{"round": r, "side": side, "img_s": {"a": a, "b": b}}
            for r, values in enumerate(({"backend": (300, 10), "xla": (100, 40), "torch": (100, 20)},
                                        {"backend": (200, 30), "xla": (100, 20), "torch": (100, 20)},
                                        {"backend": (250, 20), "xla": (50, 20), "torch": (120, 20)}), 1)
            for side, (a, b) in values.items()]
    assert cpu.medians(rows)["backend"] == {"a": 250, "b": 20}
    meta = {"models": ["a", "b"], "sides": ["backend", "xla", "torch"], "batch": 128, "steps": 20,
            "machine": "a CPU, 2 cores", "about": {"torch": "torch 2.13"}}
    table = cpu.markdown(rows, meta).splitlines()
    assert table[0].startswith("Train step images/s at batch 128, median of 3 round(s) of 20 steps; a CPU, 2 cores;")
    assert "| cnnjax, CPU backend | 250 | 20 | |" in table and "| PyTorch eager | 100 | 20 | |" in table
    assert "| CPU backend / PyTorch eager | 2.50x | 1.00x | **1.58x** |" in table  # sqrt(2.5 * 1.0)
    assert "| plain XLA / PyTorch eager | 1.00x | 1.00x | **1.00x** |" in table
    meta["sides"] = ["backend", "glibc"]
    rows += [{"round": 1, "side": "glibc", "img_s": {"a": 125, "b": 20}}]
    assert cpu.markdown(rows, meta).splitlines()[-1] == ("| allocator settings: CPU backend / CNNJAX_MALLOC=glibc "
                                                         "| 2.00x | 1.00x | **1.41x** |")


def test_the_cpu_table_times_each_side_in_its_own_process_with_the_backend_switched(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench.cpu", "--models", "simple_cnn@28", "--rounds", "1",
                           "--steps", "1", "--warmup", "0", "--batch", "8", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert [r["side"] for r in saved["rows"]] == ["backend", "xla", "torch"] and saved["complete"]
    assert all(r["img_s"]["simple_cnn@28"] > 0 for r in saved["rows"])
    about = saved["meta"]["about"]
    assert "off (CNNJAX_CPU_BACKEND=0)" in about["xla"] and "off" not in about["backend"]
    assert about["torch"].startswith("torch ")
    assert "| CPU backend / PyTorch eager |" in done.stdout and "| plain XLA / PyTorch eager |" in done.stdout
    shown = subprocess.run([sys.executable, "-m", "experiments.bench.cpu", "--render", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() in done.stdout
    bad = subprocess.run([sys.executable, "-m", "experiments.bench.cpu", "--sides", "backend,gpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --models must name bench")


# --- each conv and max-pool alone --------------------------------------------------------------------------------


def test_model_layers_lists_each_distinct_conv_and_max_pool_with_its_calls():
    found = convs.model_layers("cifar_resnet20")
    got = [(tuple(c["input"]), c["features"], c["strides"][0], c["count"], c["first"]) for c in found["conv"]]
    assert got == [((32, 32, 3), 16, 1, 1, True), ((32, 32, 16), 16, 1, 6, False), ((32, 32, 16), 32, 2, 1, False),
                   ((16, 16, 32), 32, 1, 5, False), ((16, 16, 32), 64, 2, 1, False), ((8, 8, 64), 64, 1, 5, False)]
    assert found["conv"][0]["pads"] == [[1, 1], [1, 1]] and found["pool"] == []
    (stem_pool,) = convs.model_layers("resnet18")["pool"]
    assert stem_pool == {"input": [16, 16, 64], "window": [3, 3], "stride": [2, 2], "padding": [1, 1], "count": 1}
    first, second = convs.model_layers("lenet5")["conv"][:2]
    assert (first["features"], second["input"]) == (6, [14, 14, 6])  # the same channels on every platform


def test_conv_and_pool_rows_time_every_layer_and_sum_the_convs_per_step():
    pytest.importorskip("torch")
    layers = convs.model_layers("simple_cnn@28")
    rows = convs.conv_rows("simple_cnn@28", batch=2, steps=1)
    assert len(rows) == len(layers["conv"]) + 1 and rows[-1].startswith("| **per train step** |")
    cells = [row.strip("|").split("|") for row in rows[:-1]]
    counts = [int(c[1]) for c in cells]
    assert counts == [c["count"] for c in layers["conv"]]
    times = [[float(v) for v in c[3:9]] for c in cells]
    assert all(v > 0 for t in times for v in t)
    totals = [float(v.strip(" *")) for v in rows[-1].strip("|").split("|")[3:9]]
    # Each cell is printed to 0.01 and each total to 0.1: they agree within those roundings, times the calls.
    slack = 0.05 + 0.005 * sum(counts)
    for i, total in enumerate(totals):
        assert abs(total - sum(n * t[i] for n, t in zip(counts, times, strict=True))) <= slack + 1e-9
    pools = convs.pool_rows("simple_cnn@28", batch=2, steps=1)
    assert len(pools) == len(layers["pool"]) == 2
    assert all(float(v) > 0 for row in pools for v in row.strip("|").split("|")[2:] if v.strip() != "nan")


# --- PyTorch in a process of its own -----------------------------------------------------------------------


def test_in_fresh_process_runs_the_function_elsewhere_with_its_arguments_and_environment():
    import math
    import os

    assert benchlib.in_fresh_process(math.hypot, 3, 4) == 5.0
    assert benchlib.in_fresh_process(os.getpid) != os.getpid()
    env = {**os.environ, "BENCH_PROBE": "from the parent"}
    assert benchlib.in_fresh_process(os.getenv, "BENCH_PROBE", env=env) == "from the parent"
    assert benchlib.in_fresh_process(os.getenv, "BENCH_PROBE") is None


def test_in_fresh_process_reports_the_childs_error_in_one_line():
    import math

    with pytest.raises(RuntimeError, match=r"^sqrt failed in its own process \(exit 1\): ValueError: math domain"):
        benchlib.in_fresh_process(math.sqrt, -1.0)


def test_in_fresh_process_child_ends_when_its_parent_is_killed():
    """A parent stopped by a signal to its own id (not its process group) leaves no child running on."""
    script = ("import time; from experiments.bench.lib import in_fresh_process; "
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
