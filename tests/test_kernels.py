"""The seam (cnnjax.kernels): one jitted train step, the CPU backend's kernels only where it is lowered for the CPU;
the core's import graph has no circle and imports nothing private; nothing happens on import."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import kernels, layers
from cnnjax.cpu import onednn
from cnnjax.train.evaluation import Evaluator
from cnnjax.train.runner import _chunk_fn
from cnnjax.train.state import create_train_state
from cnnjax.train.steps import StepSpec, train_step
from experiments.bench.lib import SHAPES, ZOO_ROWS, bench_model, bench_spec

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_CALL = re.compile(r'custom_call\s*@(\w+)|call_target_name\s*=\s*"(\w+)"')
SPEC = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)


def _custom_calls(text: str) -> set[str]:
    return {a or b for a, b in CUSTOM_CALL.findall(text)}


class Stem(nn.Module):
    """ResNet's ops in small: a 3x3 conv, BatchNorm, an overlapping strided max-pool, a strided conv, a head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.BatchNorm()(layers.Conv(8, 3, padding=1)(x), train))
        x = layers.MaxPool(3, 2, 1)(x)
        x = nn.relu(layers.BatchNorm()(layers.Conv(16, 3, 2, 1, use_bias=False)(x), train))
        return layers.Dense(10)(layers.global_avg_pool(x))


def _step_and_args(hw: int = 16):
    """A jitted train step of :class:`Stem` and its arguments (random images)."""
    state = create_train_state(Stem(), optax.sgd(0.1, momentum=0.9), (hw, hw, 3), jax.random.PRNGKey(0))
    images = jnp.asarray(np.random.RandomState(0).randint(0, 255, (4, hw, hw, 3)), jnp.uint8)
    labels = jnp.arange(4, dtype=jnp.int32)
    return jax.jit(functools.partial(train_step, spec=SPEC)), (state, images, labels)


def test_the_train_step_lowered_for_cuda_and_tpu_holds_no_cnnjax_custom_call():
    step, args = _step_and_args()
    exported = jax.export.export(step, platforms=["cuda", "tpu"])(*args)
    text = exported.mlir_module()
    assert "convolution" in text and "reduce_window" in text  # XLA's own conv and max-pool
    assert not {c for c in _custom_calls(text) if c.startswith("cnnjax")}
    assert "cnnjax_onednn" not in text


# The later families' rows lower under -m slow, but MobileNetV2's (depthwise convs, inverted residuals).
@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.slow) if r in ZOO_ROWS and r != "mobilenet_v2@224"
                                 else r for r in SHAPES])
def test_every_bench_models_train_and_eval_steps_lower_for_cuda_and_tpu_without_cnnjax_calls(row):
    """The programs an accelerator run compiles: the runner's chunk (a ``lax.scan`` of 3 steps with its padding
    mask, gathering batches from the resident split) and the evaluator's program (``shard_map`` over the local
    devices). Tracing only: the state is abstract (``jax.eval_shape``), nothing is initialised or compiled."""
    model, spec = bench_model(row), bench_spec(SHAPES[row])
    state = jax.eval_shape(lambda k: create_train_state(model, optax.sgd(0.1, momentum=0.9), SHAPES[row], k),
                           jax.random.PRNGKey(0))
    images = jax.ShapeDtypeStruct((8, *SHAPES[row]), jnp.uint8)
    labels = jax.ShapeDtypeStruct((8,), jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    acc = {"loss_sum": f32, "correct": f32, "count": f32}
    ids, valid = jax.ShapeDtypeStruct((3, 4), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.bool_)
    chunk = jax.jit(_chunk_fn(spec, scan=True, axis_name=None, gather=True))
    evaluate = Evaluator(spec, model.apply, jax.local_devices()[:1]).eval_fn
    totals = acc | {"confusion": jax.ShapeDtypeStruct((10, 10), jnp.float32)}
    for fn, args in ((chunk, (state, acc, images, labels, ids, valid)),
                     (evaluate, (totals, state.params, state.batch_stats, images, labels,
                                 jax.ShapeDtypeStruct((8,), jnp.float32)))):
        text = jax.export.export(fn, platforms=["cuda", "tpu"])(*args).mlir_module()
        assert "convolution" in text
        assert not {c for c in _custom_calls(text) if c.startswith("cnnjax")}, row
    assert "stablehlo.while" in jax.export.export(chunk, platforms=["cuda"])(
        state, acc, images, labels, ids, valid).mlir_module()


def test_the_same_step_runs_the_cpu_backend_where_lowered_for_the_cpu_and_not_when_switched_off(monkeypatch):
    step, args = _step_and_args()
    cpu_calls = _custom_calls(step.lower(*args).as_text())
    assert {onednn.CONV_TARGET, onednn.POOL_FORWARD_TARGET, onednn.POOL_BACKWARD_TARGET} <= cpu_calls \
        or onednn.CONV_TARGET in cpu_calls and not onednn.load().avx512  # max-pools by strided views there
    monkeypatch.setenv(kernels.SWITCHES["cpu"], "0")
    plain, _ = _step_and_args()  # a fresh jit: the switch is read when tracing
    assert not {c for c in _custom_calls(plain.lower(*args).as_text()) if c.startswith("cnnjax")}
    assert "off (CNNJAX_CPU_BACKEND=0)" in kernels.describe()


@pytest.mark.skipif(not onednn.load().available, reason="the CPU backend is not built here (python -m cnnjax.cpu)")
def test_one_step_on_either_path_gives_the_same_numbers(monkeypatch):
    step, (state, images, labels) = _step_and_args()
    new_cpu, metrics_cpu = step(state, images, labels)
    monkeypatch.setenv(kernels.SWITCHES["cpu"], "0")
    plain, _ = _step_and_args()
    new_xla, metrics_xla = plain(state, images, labels)
    np.testing.assert_allclose(metrics_cpu["loss_sum"], metrics_xla["loss_sum"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           new_cpu.params, new_xla.params)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from cnnjax... import`` / ``import cnnjax...`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnjax") and not node.level:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("cnnjax")]
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_cnnjax_has_no_import_circle_and_imports_no_private_name():
    files = {_module_name(p): p for p in (ROOT / "cnnjax").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for module, names in _imports(path):
            for imported in names or [""]:
                full = f"{module}.{imported}" if imported else module
                target = full if full in files else module
                if target in files and target != name:
                    targets.add(target)
                if imported.startswith("_"):
                    pytest.fail(f"{name} imports the private name {imported} from {module}")
        graph[name] = targets

    def circle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = circle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    for start in graph:
        circle = circle_from(start, start, [start])
        assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_no_function_in_cnnjax_is_longer_than_60_lines():
    long = []
    for path in (ROOT / "cnnjax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long


def test_importing_cnnjax_changes_nothing_in_the_process():
    """No environment change, no signal handler, no compiler run: every module of cnnjax imported in a fresh
    process whose oneDNN library directory is empty."""
    modules = sorted(_module_name(p) for p in (ROOT / "cnnjax").rglob("*.py") if p.name != "__main__.py")
    code = (
        "import json, os, signal, sys\n"
        "env, handlers = dict(os.environ), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print(json.dumps({'env': dict(os.environ) == env,"
        " 'signals': handlers == [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],"
        " 'jax_backends': bool(getattr(sys.modules.get('jax._src.xla_bridge'), '_backends', None))}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_CACHE_HOME": "/nonexistent"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"env": True, "signals": True, "jax_backends": False}
