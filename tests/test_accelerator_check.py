"""The GPU acceptance command on the CPU: its checks with --allow_cpu (the accelerator side a second CPU device
with scan chunks), its summary, and experiments/gpu_acceptance.sh's syntax, budgets and control flow."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench import accelerator_check as ac

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_acceptance.sh"
BUDGET_S = 480  # the 8 minutes on one H100 / H200


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.bench.accelerator_check", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A small synthetic CIFAR-shaped set (300 train, 500 test images) shared by the training checks."""
    root = str(tmp_path_factory.mktemp("cifar"))
    args = ac.parse_args(["bf16", "--train_images", "300"])
    return ac.synthetic_data(args, root)


def test_backend_cli(tmp_path):
    out = tmp_path / "checks.json"
    allowed = run_check("backend", "--allow_cpu", "--out", str(out))
    assert allowed.returncode == 0, allowed.stderr
    saved = json.loads(out.read_text())["backend"]
    assert saved["ok"] and saved["device_count"] >= 2 and saved["jax"] and saved["jaxlib"]
    assert allowed.stdout.startswith("backend: ok backend ")
    refused = run_check("backend", "--out", str(out))  # this machine has no GPU: the check must say so
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not 'gpu'" in refused.stdout
    assert json.loads(out.read_text())["backend"]["ok"] is False


def test_step_parity_scan_equals_host_loop(tmp_path):
    out = tmp_path / "checks.json"
    # The check adds a second CPU device itself; plain XLA on the CPU, as gpu_acceptance.sh runs it (XLA:CPU's scan
    # and host-loop programs round differently, which the tolerances must absorb).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"CNNJAX_CPU_BACKEND": "0"}
    done = run_check("step_parity", "--allow_cpu", "--models", "lenet5@28,cifar_resnet20", "--batch", "8", "--out",
                     str(out), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = json.loads(out.read_text())["step_parity"]
    assert saved["accelerator"] == "cpu:1" and saved["cpu"] == "cpu:0"
    assert [r["model"] for r in saved["rows"]] == ["lenet5@28", "cifar_resnet20"]
    for row in saved["rows"]:
        assert row["ok"] and row["steps"] == 3
        assert row["params_rel_l2"] < ac.PARAMS_REL_L2 and row["loss_rel"] < ac.LOSS_RTOL


def test_step_parity_flags_a_different_step():
    """compare_sides rejects a side whose loss or parameters differ beyond float32 rounding."""
    import jax

    problem = ac.parity_problem("lenet5@28", 4, 2)
    cpu = jax.devices("cpu")[0]
    side = ac.train_on(problem, cpu, False)[-1]
    assert ac.compare_sides("lenet5@28", problem, side, side)["ok"]
    state, metrics = side
    off_loss = (state, {**metrics, "loss_sum": metrics["loss_sum"] * (1 + 1e-3)})
    assert not ac.compare_sides("lenet5@28", problem, off_loss, side)["ok"]
    nudged = jax.tree_util.tree_map(lambda p: p * (1 + 1e-3), state.params)
    row = ac.compare_sides("lenet5@28", problem, (state.replace(params=nudged), metrics), side)
    assert not row["ok"] and row["params_rel_l2"] > ac.PARAMS_REL_L2


def test_resume_is_bitwise_equal(data):
    args = ac.parse_args(["resume", "--allow_cpu", "--data", data, "--model", "gap_cnn", "--train_images", "300",
                          "--train_batch", "30", "--chunk", "4", "--stop_after", "5"])
    out = ac.check_resume(args)
    assert out["stopped"]["interrupted"] and out["stopped"]["epoch"] == 1
    assert out["differing_leaves"] == 0 and out["leaves"] > 0 and out["steps"][0] == out["steps"][1]


def test_bf16_training_learns_in_float32_variables(data):
    args = ac.parse_args(["bf16", "--allow_cpu", "--data", data, "--model", "gap_cnn", "--train_images", "300",
                          "--train_batch", "30", "--epochs", "3"])
    out = ac.check_bf16(args)
    assert len(out["train_loss"]) == 3 and out["train_loss"][-1] < out["train_loss"][0]
    assert out["variable_dtypes"] == ["float32"]


@pytest.mark.slow
def test_compile_cache_and_two_process_cli(tmp_path, data):
    out = tmp_path / "checks.json"
    common = ["--allow_cpu", "--out", str(out), "--data", data, "--epochs", "1", "--train_config",
              "experiments/configs/cifar10_resnet20.py",
              "--train_args=--config.batch_size=40 --config.model.name=gap_cnn --config.data.cache_dir="]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    for check, more in (("compile_cache", []), ("two_process", ["--stop_after", "2"])):
        done = run_check(check, *common, *more, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    saved = json.loads(out.read_text())
    assert [r["first_epoch_s"] > 0 for r in saved["compile_cache"]["runs"]] == [True, True]
    assert saved["two_process"]["status"] in (0, ac.EXIT_INTERRUPTED)


def _row(model, batch, precision, ours, eager, compiled):
    return {"model": model, "batch": batch, "precision": precision, "jax": {"train_img_s": ours},
            "torch_eager": {"train_img_s": eager}, "torch_compile": {"train_img_s": compiled}}


def test_summary_names_the_device_once_and_judges_the_goals(tmp_path):
    (tmp_path / "sections.tsv").write_text("backend\t30\t0\t5\nthroughput_fp32\t65\t124\t65\nrecipe\t70\t0\t50\n")
    backend = {"ok": True, "line": "backend gpu, 1 x NVIDIA H200", "device_kind": "NVIDIA H200", "device_count": 1,
               "backend": "gpu", "jax": "0.11.2", "jaxlib": "0.11.2"}
    cache = {"ok": True, "line": "x", "first_epoch_ratio": 4.0,
             "runs": [{"first_epoch_s": 8.0, "process_s": 20.0}, {"first_epoch_s": 2.0, "process_s": 9.0}]}
    (tmp_path / "checks.json").write_text(json.dumps({"backend": backend, "compile_cache": cache}))
    rows = [_row("cifar_resnet20", 128, "fp32", 300, 200, 250), _row("cifar_resnet20", 1024, "fp32", 90, 100, 100)]
    (tmp_path / "throughput_fp32.json").write_text(json.dumps({"meta": {"torch": "2.5"}, "rows": rows}))
    recipe = {"meta": {"steps_per_epoch": 44, "batch": 1024, "precision": "fp32"},
              "rows": [{"side": "cnnjax", "epoch_s": [9.0, 0.3]}, {"side": "torch eager", "epoch_s": [1.5, 0.5]},
                       {"side": "torch.compile", "epoch_s": [30.0, 0.4]}]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert ac.main(["summary", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.count("NVIDIA H200") == 1 and text.startswith("# GPU acceptance on NVIDIA H200")
    goals = [line.rsplit("|", 2)[-2].strip() for line in text.splitlines() if line.startswith("| cifar_resnet20")]
    assert goals == ["met", "missed (within 5% of compile)"]
    assert "124 (timed out)" in text and "2 rows, complete: False" in text
    assert "last epoch at least as fast as torch.compile's: met" in text
    assert "Warm first epoch / PyTorch eager's first epoch: 1.33 (goal <= 2: met)" in text


def test_script_syntax():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def section_budgets() -> list[tuple[str, int]]:
    """``(name, seconds)`` of every ``section NAME SECONDS ...`` line of the script, in order."""
    lines = SCRIPT.read_text().splitlines()
    return [(m.group(1), int(m.group(2))) for m in (re.match(r"\s*section\s+(\S+)\s+(\d+)\s", line) for line in lines)
            if m]


def test_script_budgets_fit_eight_minutes():
    budgets = section_budgets()
    names = [name for name, _ in budgets]
    assert names.index("backend") == (names[0] == "summary")  # first to run (summary's line is in finish())
    assert {"step_parity", "resume", "bf16", "throughput_fp32", "throughput_bf16", "recipe", "compile_cache",
            "two_process", "summary"} <= set(names)
    assert len(names) == len(set(names))  # every section runs once: its budget is counted once
    assert sum(seconds for _, seconds in budgets) <= BUDGET_S


FAKE_PYTHON = """#!/usr/bin/env bash
case " $* " in
  *" summary "*) exec {python} "$@" ;;
  *" backend "*) echo "backend: fake"; exit "${{FAKE_BACKEND_RC:-0}}" ;;
  *) echo "fake: $*"; exit "${{FAKE_RC:-0}}" ;;
esac
"""


@pytest.mark.parametrize("backend_rc, other_rc, gpus", [(0, 0, 1), (0, 3, 2), (1, 0, 2)])
def test_script_runs_every_section_and_stops_without_a_gpu(tmp_path, backend_rc, other_rc, gpus):
    """With a stand-in interpreter and nvidia-smi: the sections run in order (the 2-process one with 2 GPUs),
    a failure is reported after the summary (exit 1), and a failed backend check stops the script at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON.format(python=sys.executable)),
                       ("nvidia-smi", "#!/bin/sh\n" + "".join(f"echo 'GPU {i}: fake'\n" for i in range(gpus)))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PYTHON=str(bin_dir / "python"), FAKE_BACKEND_RC=str(backend_rc), FAKE_RC=str(other_rc),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    ran = [line.split("\t")[0] for line in (tmp_path / "out" / "sections.tsv").read_text().splitlines()]
    names = [n for n, _ in section_budgets() if n != "summary" and (gpus >= 2 or n != "two_process")]
    assert ran == (["backend"] if backend_rc else names) + ["summary"]
    assert done.returncode == (1 if backend_rc or other_rc else 0), done.stdout + done.stderr
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# GPU acceptance on")
