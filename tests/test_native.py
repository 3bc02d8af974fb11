"""cnnjax.native.onednn: the build is cached, atomic and explains itself when it cannot work; the switch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax.errors import UsageError
from cnnjax.native import onednn
from tests.onednn_marks import needs_onednn

BUFFER_BOUNDS = Path(__file__).with_name("native") / "buffer_bounds.cc"


def test_missing_compiler_or_header_is_one_line_naming_the_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    monkeypatch.setattr(onednn.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match=r"apt-get install g\+\+ libdnnl-dev") as e:
        onednn.build()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "lib").exists()  # nothing written
    monkeypatch.undo()
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    monkeypatch.setattr(onednn, "HEADER", tmp_path / "no_dnnl.hpp")
    with pytest.raises(UsageError, match="libdnnl-dev"):
        onednn.build()


def test_a_failed_compile_leaves_no_file_behind(monkeypatch, tmp_path):
    if not onednn.HEADER.is_file():
        pytest.skip("no oneDNN header here")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    with pytest.raises(UsageError, match="building cnnjax's oneDNN convolutions failed"):
        onednn.build()
    assert list((tmp_path / "lib").iterdir()) == []  # the temporary file is removed


def test_build_is_cached_per_source_and_written_under_its_final_name_only(monkeypatch, tmp_path):
    if not onednn.HEADER.is_file():
        pytest.skip("no oneDNN header here")
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "ro", tmp_path / "lib"])
    (tmp_path / "ro").write_text("a file, so this directory cannot be made")
    path = onednn.build()
    assert path.parent == tmp_path / "lib" and path.name.startswith("libcnnjax_onednn-")
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    assert onednn.build() == path and path.stat().st_mtime_ns == mtime  # not built again
    other = tmp_path / "other.cc"
    other.write_text(onednn.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(onednn, "SOURCE", other)
    assert onednn.build() != path  # another source, another library


def test_switch_off_keeps_xlas_convolutions():
    code = ("from cnnjax.native import onednn; from cnnjax import conv; import jax.numpy as jnp; "
            "x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)); "
            "print(onednn.available(), conv.onednn_usable(x, w))")
    env = dict(os.environ, CNNJAX_ONEDNN="0", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    main = subprocess.run([sys.executable, "-m", "cnnjax.native.onednn"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert main.returncode == 0 and "XLA's convolutions" in main.stderr


def test_an_unknown_kernel_gradient_mode_is_one_line_naming_the_modes(monkeypatch):
    monkeypatch.setenv(onednn.WGRAD_CHOICE, "fast")
    with pytest.raises(UsageError, match=r"CNNJAX_ONEDNN_WGRAD='fast' is not a mode: set it to one of auto, native"):
        onednn._load.__wrapped__()


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def test_bfloat16_kernels_exactly_where_the_cpu_has_avx512():
    """oneDNN 2.6 builds bfloat16 convolutions and pools on AVX-512 (avx512_core: f, bw, vl, dq) and nowhere else;
    ``describe()`` says so where it cannot. An AVX2-only AMD EPYC Zen 3 is the 'cannot' case."""
    flags = _cpu_flags()
    if not flags or not onednn.available():
        pytest.skip("needs x86 /proc/cpuinfo and cnnjax's oneDNN library")
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert onednn.bf16_available() == avx512_core
    assert ("float32 only" in onednn.describe()) == (not avx512_core)
    assert onednn.runs("float32") and onednn.runs("bfloat16") == avx512_core and not onednn.runs("float16")


@needs_onednn
def test_the_kernels_touch_nothing_outside_their_buffers(tmp_path):
    """oneDNN 2.6 wrote past the scratchpad of strided 1x1 kernel gradients (up to 21 KB past 3 KB), which corrupted
    the heap: aborts and segfaults in later tests. The handler over a sweep of convolution and max-pool geometries,
    every buffer ending at an unmapped page (tests/native/buffer_bounds.cc)."""
    harness = tmp_path / "buffer_bounds"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    subprocess.run(onednn.compile_command(compiler, BUFFER_BOUNDS, harness, "-O1", f"-I{onednn.SOURCE.parent}"),
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([str(harness)], capture_output=True, text=True, timeout=300)
    assert "self-check: a write one byte past a buffer gave 1 report(s)" in done.stdout, done.stdout[-2000:]
    assert done.returncode == 0, done.stdout[-3000:]
    convs, pools = map(int, re.search(r"checked (\d+) convolution and (\d+) max-pool", done.stdout).groups())
    assert convs > 8000 and pools > 100  # kernel gradients by each of the three paths
    assert done.stdout.rstrip().endswith("no access outside any buffer")
