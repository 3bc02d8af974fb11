"""cnnjax.cpu.onednn: the build is cached, atomic and explains itself in one line when it cannot work; the bfloat16
kernels exist exactly where the CPU has AVX-512; ``python -m cnnjax.cpu`` builds and checks; the handlers touch
nothing outside their buffers (tests/cpu_native/buffer_bounds.cc)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax.cpu import onednn
from cnnjax.errors import UsageError
from tests.onednn_marks import BUILT, library, needs_onednn

BUFFER_BOUNDS = Path(__file__).with_name("cpu_native") / "buffer_bounds.cc"
# A stand-in for the handlers where a test needs a compile but not the handlers themselves (g++ takes seconds on
# it instead of a minute); it links against the same libraries.
TINY_SOURCE = 'extern "C" int cnnjax_build_probe() { return 1; }\n'
CAN_COMPILE = onednn.HEADER.is_file() and shutil.which(os.environ.get("CXX", "g++")) is not None
needs_header = pytest.mark.skipif(not CAN_COMPILE, reason="no C++ compiler or oneDNN header here")


def test_missing_compiler_or_header_is_one_line_naming_the_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    monkeypatch.setattr(onednn.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match=r"^cannot build cnnjax's oneDNN kernels: .*apt-get install g\+\+ libdnnl-dev"
                       ) as e:
        onednn.build()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "lib").exists()  # nothing written
    monkeypatch.undo()
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    monkeypatch.setattr(onednn, "HEADER", tmp_path / "no_dnnl.hpp")
    with pytest.raises(UsageError, match="libdnnl-dev"):
        onednn.build()
    assert not (tmp_path / "lib").exists()


@needs_header
def test_a_failed_compile_is_one_line_and_leaves_no_file_behind(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCE", broken)
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "lib"])
    with pytest.raises(UsageError, match=r"^building cnnjax's oneDNN kernels failed \(.+\); install") as e:
        onednn.build()
    assert "\n" not in str(e.value)
    assert list((tmp_path / "lib").iterdir()) == []  # the temporary file is removed
    assert onednn.built() is None


@needs_header
def test_build_is_cached_per_source_and_written_under_its_final_name_only(monkeypatch, tmp_path):
    source = tmp_path / "probe.cc"
    source.write_text(TINY_SOURCE)
    monkeypatch.setattr(onednn, "SOURCE", source)
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "ro", tmp_path / "lib"])
    (tmp_path / "ro").write_text("a file, so this directory cannot be made")
    assert onednn.built() is None
    path = onednn.build()
    assert path.parent == tmp_path / "lib" and re.fullmatch(r"libcnnjax_onednn-[0-9a-f]{16}\.so", path.name)
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [path.name]  # no temporary left
    assert onednn.built() == path
    mtime = path.stat().st_mtime_ns
    assert onednn.build() == path and path.stat().st_mtime_ns == mtime  # not built again
    source.write_text(TINY_SOURCE + "// changed\n")
    assert onednn.built() is None  # another source, another library
    other = onednn.build()
    assert other != path and other.parent == path.parent and path.is_file()


@needs_header
def test_an_unwritable_cache_is_one_line_naming_xdg_cache_home(monkeypatch, tmp_path):
    (tmp_path / "a").write_text("a file")
    (tmp_path / "b").write_text("a file")
    monkeypatch.setattr(onednn, "_library_dirs", lambda: [tmp_path / "a" / "lib", tmp_path / "b" / "lib"])
    with pytest.raises(UsageError, match=r"^cannot write cnnjax's oneDNN library \(.*\); set XDG_CACHE_HOME") as e:
        onednn.build()
    assert "\n" not in str(e.value)


def test_the_library_lives_in_the_package_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert onednn._library_dirs() == [onednn.SOURCE.with_name("_lib"), tmp_path / "cnnjax"]
    assert onednn.SOURCE.name == "onednn_kernels.cc" and onednn.SOURCE.is_file()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


@needs_onednn
def test_bfloat16_kernels_exactly_where_the_cpu_has_avx512():
    """oneDNN builds bfloat16 convolutions and pools on AVX-512 (avx512_core: f, bw, vl, dq) and nowhere else; the
    library's description says so where it cannot. An AVX2-only AMD EPYC Zen 3 is the 'cannot' case."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("needs x86 /proc/cpuinfo")
    lib = library()
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert lib.avx512 == avx512_core
    assert ("float32 only: no AVX-512" in lib.what) == (not avx512_core)
    assert onednn.runs("float32") and onednn.runs("bfloat16") == avx512_core
    assert not onednn.runs("float16") and not onednn.runs("float64")


@pytest.mark.skipif(not BUILT and not CAN_COMPILE, reason="oneDNN kernels neither built nor buildable here")
def test_python_m_cnnjax_cpu_builds_checks_and_prints_the_diffs():
    done = subprocess.run([sys.executable, "-m", "cnnjax.cpu"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"oneDNN kernels: (\S+) \(max \|diff\| to plain XLA: conv (\S+), max-pool (\S+)\)", done.stdout)
    assert found, done.stdout
    assert Path(found.group(1)).is_file() and found.group(1) == str(onednn.built())
    assert float(found.group(2)) < 1e-4 and float(found.group(3)) == 0.0


@pytest.mark.slow
@needs_onednn
def test_the_kernels_touch_nothing_outside_their_buffers(tmp_path):
    """oneDNN 2.6 wrote past the scratchpad of strided 1x1 kernel gradients (up to 21 KB past 3 KB), which corrupted
    the heap: aborts and segfaults in later tests. The handlers over a sweep of convolution and max-pool geometries,
    every buffer ending at an unmapped page (tests/cpu_native/buffer_bounds.cc; about 25 s: a compile and 17,000
    executions)."""
    harness = tmp_path / "buffer_bounds"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    subprocess.run(onednn.compile_command(compiler, BUFFER_BOUNDS, harness, "-O1", f"-I{onednn.SOURCE.parent}"),
                   check=True, capture_output=True, timeout=600)
    done = subprocess.run([str(harness)], capture_output=True, text=True, timeout=600)
    assert "self-check: a write one byte past a buffer gave 1 report(s)" in done.stdout, done.stdout[-2000:]
    assert done.returncode == 0, done.stdout[-3000:]
    convs, pools = map(int, re.search(r"checked (\d+) convolution and (\d+) max-pool", done.stdout).groups())
    assert convs > 8000 and pools > 100  # kernel gradients by each of the three paths
    assert done.stdout.rstrip().endswith("no access outside any buffer")
