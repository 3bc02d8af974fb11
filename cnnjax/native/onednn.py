"""oneDNN convolutions and max-pools for XLA:CPU through FFI custom calls (``onednn_kernels.cc``), built on first use.

jaxlib 0.10's XLA:CPU runs convolutions through Eigen (or YNNPACK) kernels; oneDNN's, which PyTorch uses on
the CPU, take 1.2-2.5x less time forward+backward on the zoo's convs (cifar_resnet20's 189.5 against 81.9 ms per
train step, ``python -m experiments.bench_conv --only torch``, with ``CNNJAX_ONEDNN=0`` and without). No
library of the JAX ecosystem exposes them to JAX (this jaxlib is built without XLA's oneDNN convolutions), so
this module compiles a small handler against the system's oneDNN (Debian ``libdnnl-dev``) and jaxlib's FFI
headers with ``g++`` into ``cnnjax/native/_lib/`` (or ``$XDG_CACHE_HOME/cnnjax`` when the package is
read-only), once per source and jaxlib version (about 4 s). ``python -m cnnjax.native.onednn`` builds it
ahead of time and says whether it works. Without a compiler or oneDNN, :func:`available` is False and
``cnnjax.conv`` keeps XLA's convolutions; ``CNNJAX_ONEDNN=0`` switches the kernels off.

Each call splits its batch into slices that run single-threaded on the calling XLA thread and one more of XLA's
intra-op pool, instead of on oneDNN's OpenMP team (one team per XLA thread that called it, more threads than
cores): cifar_resnet20's train step 1.16x, improved_cnn 1.08x (2 cores, 2026-12-04, ``python -m
experiments.bench_cpu --variants="+oneDNN greyscale gradients,+oneDNN on XLA's threads"``).
``CNNJAX_ONEDNN_THREADS=omp`` runs each call whole on the OpenMP team, as before. Two slices a call (one for
each of the two threads) since 2026-12-05, four before (``CNNJAX_ONEDNN_SLICES`` sets the count; bench variant
``+two oneDNN slices``).

bfloat16 kernel gradients of stride-1 convolutions with outputs up to 8x8 do not use oneDNN 2.6's
backward-weights primitive, whose AMX kernel (the older jit one) took 3-5x its forward's time on fast_cnn's
256-channel convolutions on 6x6 and 3x3 maps: outputs up to 4x4 run as one forward convolution with the batch as
the channels, up to 8x8 as one matrix product of the input patches (``onednn_kernels.cc``; the rule is
``cnnjax.conv.onednn_wgrad_path``).
``[512, 3, 3, 256] -> 256``: 12.7 against 60.4 ms; ``[512, 6, 6, 256] -> 256``: 55.2 against 92.5 ms; the
bfloat16 step of ``fashion_mnist_30min`` (fast_cnn@28, batch 512) 15-20% shorter (2-core Xeon with AMX, 2026-12-06).
On CPUs without AVX-512 (oneDNN's jit:avx2 kernels), float32 kernel gradients of stride-1 convolutions take the
path measured fastest for their shape (``cnnjax.conv.onednn_wgrad_path``; ``python -m experiments.bench_onednn_paths``):
the primitive for stems, greyscale inputs and outputs of under 32 channels, a matrix product where the conv at
least doubles its channels to 64 or more or the map is at most 4x4, a forward convolution otherwise. On a 2-core
Zen 3 EPYC (2026-12-07) fast_cnn's kernel gradients at batch 128 took 0.78x the primitive's time, fast_cnn@28's at
batch 512 0.82x.
Their float32 stride-1 forwards run as oneDNN's input gradient of the transposed conv (flipped kernel, channels
swapped; ``cnnjax.conv.onednn_forward_as_input_gradient``), whose jit:avx2 kernel beat the NHWC forward there on
every fast_cnn shape (``[128, 7, 7, 256] -> 256``: 58.3 against 80.8 ms).
The Python side picks the path per call (the handler's ``wgrad`` attribute). ``CNNJAX_ONEDNN_WGRAD``: ``auto``
(default), ``native`` (always the primitive), ``forward`` or ``matmul`` (that path for every stride-1 undilated
convolution, in either dtype).
Kernel gradients of strided 1x1 convolutions, in either dtype and whatever that setting, run as the unit-stride
kernel gradient of the gathered input: oneDNN 2.6's own writes past its scratchpad for inputs of few channels
(``onednn_kernels.cc``; ``tests/native/buffer_bounds.cc`` checks every buffer's bounds).

oneDNN 2.6 builds bfloat16 primitives only on AVX-512 CPUs (:func:`bf16_available` asks the library once, by
building them on a small geometry): on an AVX2-only CPU (an AMD EPYC Zen 3, 2026-12-06) they fail with "could not
create a primitive descriptor iterator", so there ``auto`` keeps XLA's bfloat16 convolutions and pools and runs
oneDNN's in float32 only. On that machine XLA's bfloat16 step of ``fast_cnn@28+residual`` (batch 512) was the
fastest of the three: 2.58 s, against 2.77 s for oneDNN's float32 and 2.94 s for XLA's float32 (``python -m
experiments.profile_step --fused --precision bf16|fp32 --batch 512 --models fast_cnn@28+residual --steps 5``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from cnnjax.errors import UsageError

SOURCE = Path(__file__).with_name("onednn_kernels.cc")
TARGET = "cnnjax_onednn_conv"
HANDLER = "CnnjaxOnednnConv"
# The max-pool's two calls: x -> (y, workspace) and (g, workspace) -> dx (cnnjax.layers.onednn_max_pool).
POOL_FORWARD_TARGET, POOL_BACKWARD_TARGET = "cnnjax_onednn_max_pool_fwd", "cnnjax_onednn_max_pool_bwd"
POOL_HANDLERS = {POOL_FORWARD_TARGET: "CnnjaxOnednnMaxPoolForward", POOL_BACKWARD_TARGET: "CnnjaxOnednnMaxPoolBackward"}
SWITCH = "CNNJAX_ONEDNN"
# "omp": each oneDNN call runs whole on oneDNN's OpenMP team, as before 2026-12-04; by default a call's batch slices
# run single-threaded on XLA's intra-op threads (onednn_kernels.cc, ParallelSlices). Read once per process.
THREADS_CHOICE = "CNNJAX_ONEDNN_THREADS"
# Batch slices per oneDNN call (a positive integer; default 2). Read once per process.
SLICES_CHOICE = "CNNJAX_ONEDNN_SLICES"
# How stride-1 kernel gradients run (module doc; wgrad_choice). Read once per process.
WGRAD_CHOICE = "CNNJAX_ONEDNN_WGRAD"
WGRAD_MODES = ("auto", "native", "forward", "matmul")
HEADER = Path("/usr/include/dnnl.hpp")
BF16_MISSING = "this CPU's oneDNN has no bfloat16 primitives (they need AVX-512)"
INSTALL_HINT = "install a C++ compiler and oneDNN (Debian: apt-get install g++ libdnnl-dev)"
# oneDNN's threads (GNU OpenMP) sleep as soon as a convolution ends instead of spinning, so they leave the cores
# to XLA's own threads between convolutions. `experiments.bench_ab --a "+broadcast tiled max-pool backward" --b
# "+oneDNN convolutions"` (2 cores, 5-7 rounds; B / A, median round): cifar_resnet20 0.99 with libgomp's default
# spinning, 1.42 with OMP_WAIT_POLICY=ACTIVE and 1.40-1.46 PASSIVE; resnet18 0.90, 0.96 and 0.93-1.02 (noisy runs,
# one process each). Read by libgomp when the library loads, so set only for that moment, never over a user's
# OMP_WAIT_POLICY, and only with CNNJAX_ONEDNN_THREADS=omp: by default oneDNN runs no OpenMP team, and PyTorch, which
# shares the process's libgomp, ran its eager steps 1.6x slower (lenet5) under the passive wait
# (experiments.bench_torch_beside, 2026-12-04).
OMP_WAIT_POLICY = "PASSIVE"
# Conv kinds of the handler's `kind` attribute.
FORWARD, INPUT_GRAD, KERNEL_GRAD = 0, 1, 2


def _library_name() -> str:
    from importlib import metadata

    digest = hashlib.sha256(SOURCE.read_bytes() + metadata.version("jaxlib").encode()).hexdigest()[:16]
    return f"libcnnjax_onednn-{digest}.so"


def _library_dirs() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnjax"
    return [Path(__file__).with_name("_lib"), cache]


def compile_command(compiler: str, source: Path, output: str | Path, *flags: str) -> list[str]:
    """The command that compiles ``source`` (this handler, or a test built around it) against jaxlib's FFI headers
    and oneDNN into ``output``; ``flags`` go before the source (optimisation, ``-shared``, include directories)."""
    import jax

    return [compiler, "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", *flags, str(source), "-o", str(output),
            "-ldnnl", "-lgomp"]


def build(quiet: bool = True) -> Path:
    """Compile the handler (if not built yet) and return the shared library's path.

    Raises :class:`UsageError` in one line when no compiler or oneDNN header is found or compilation fails.
    The library is written under a temporary name and renamed into place, so concurrent builds never see
    a half-written file."""
    name = _library_name()
    for directory in _library_dirs():
        if (directory / name).is_file():
            return directory / name
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not HEADER.is_file():
        raise UsageError(f"cannot build cnnjax's oneDNN convolutions: {INSTALL_HINT}")
    errors = []
    for directory in _library_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
        except OSError as e:
            errors.append(f"{directory}: {e.strerror}")
            continue
        os.close(fd)
        done = subprocess.run(compile_command(compiler, SOURCE, tmp, "-O2", "-shared", "-fPIC"), capture_output=True,
                              text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UsageError(f"building cnnjax's oneDNN convolutions failed ({last}); {INSTALL_HINT}")
        os.replace(tmp, directory / name)
        if not quiet:
            print(f"built {directory / name}", file=sys.stderr)
        return directory / name
    raise UsageError(f"cannot write cnnjax's oneDNN library ({'; '.join(errors)}); set XDG_CACHE_HOME to a writable "
                     "directory")


class Library(NamedTuple):
    """What :func:`_load` found: whether the kernels run (float32), the library's path or why not, and whether its
    bfloat16 primitives build on this CPU."""

    available: bool
    what: str
    bf16: bool


@functools.cache
def _load() -> Library:
    """The library once built, loaded and registered (see :class:`Library`)."""
    if os.environ.get(SWITCH, "1") == "0":
        return Library(False, f"XLA ({SWITCH}=0)", False)
    wgrad_choice.__wrapped__()  # a bad value stops here, before anything is built
    try:
        path = build()
    except UsageError as e:
        return Library(False, f"XLA ({e})", False)
    import jax

    saved = os.environ.get("OMP_WAIT_POLICY")
    if os.environ.get(THREADS_CHOICE) == "omp":  # only oneDNN's own OpenMP teams want the passive wait
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        return Library(False, f"XLA (cannot load {path}: {e})", False)
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    for target, handler in {TARGET: HANDLER, **POOL_HANDLERS}.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, handler)), platform="cpu")
    bf16 = bool(library.CnnjaxOnednnBf16())
    return Library(True, f"oneDNN ({path}{'' if bf16 else '; float32 only: ' + BF16_MISSING})", bf16)


@functools.cache
def wgrad_choice() -> str:
    """``CNNJAX_ONEDNN_WGRAD`` (read once): 'auto' (the default: ``cnnjax.conv.onednn_wgrad_path``'s rules) or
    the one kernel-gradient path ('native', 'forward', 'matmul') for every stride-1 undilated conv. Raises a
    one-line :class:`UsageError` for any other value."""
    mode = os.environ.get(WGRAD_CHOICE, "auto")
    if mode not in WGRAD_MODES:
        raise UsageError(f"{WGRAD_CHOICE}={mode!r} is not a mode: set it to one of {', '.join(WGRAD_MODES)} "
                         "or unset it")
    return mode


def available() -> bool:
    """True once the handlers are built, loaded and registered with XLA for the CPU; False (and XLA's own
    convolutions and cnnjax's strided-view pools are used) when ``CNNJAX_ONEDNN=0`` or they cannot be built or
    loaded here."""
    return _load().available


def bf16_available() -> bool:
    """True when :func:`available` and this CPU's oneDNN builds bfloat16 convolutions and max-pools (oneDNN 2.6 needs
    AVX-512 for them); without, bfloat16 convolutions and pools stay XLA's."""
    return _load().bf16


def _dtype_name(dtype) -> str:
    """``'float32'`` for a numpy / jax dtype or its name."""
    return getattr(dtype, "name", str(dtype))


def runs(dtype) -> bool:
    """Whether cnnjax's oneDNN kernels run ``dtype`` here: float32 once :func:`available`, bfloat16 once
    :func:`bf16_available`."""
    name = _dtype_name(dtype)
    return bf16_available() if name == "bfloat16" else name == "float32" and available()


def require_dtype(dtype, what: str) -> None:
    """Raise a one-line :class:`UsageError` when ``what`` (an explicit oneDNN op) is asked for ``dtype`` bfloat16
    here and :func:`bf16_available` is False; float32 passes."""
    if _dtype_name(dtype) == "bfloat16" and not bf16_available():
        raise UsageError(f"{what} cannot run bfloat16 here: {BF16_MISSING}; use float32 operands, or the 'auto' "
                         "path, which keeps XLA's for bfloat16 on this CPU")


def describe() -> str:
    """Which CPU convolutions and max-pools cnnjax uses, for logs: ``oneDNN (library path)`` or ``XLA (why not
    oneDNN)``."""
    return _load().what


def main() -> int:
    """``python -m cnnjax.native.onednn``: build the library now and check one convolution against XLA's and one
    max-pool against the strided views' (:func:`cnnjax.layers._window_max_pool`)."""
    if os.environ.get(SWITCH, "1") == "0":
        print(f"{SWITCH}=0: cnnjax uses XLA's convolutions", file=sys.stderr)
        return 0
    try:
        path = build(quiet=False)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    import numpy as np

    from cnnjax import conv, layers

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    ours = conv.conv2d(x, kernel, (1, 1), "SAME", impl="onednn")
    xla = conv.conv2d(x, kernel, (1, 1), "SAME", impl="xla")
    diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(xla))))
    pool = layers.onednn_max_pool(x, (3, 3), (2, 2), (1, 1))
    pool_diff = float(np.max(np.abs(np.asarray(pool) - np.asarray(layers._window_max_pool(x, (3, 3), (2, 2), (1, 1))))))
    print(f"oneDNN convolutions and max-pools: {path} (max |diff| on a test conv to XLA's: {diff:.1e}; on a test "
          f"max-pool to the strided views': {pool_diff:.1e})")
    return 0 if diff < 1e-4 and pool_diff == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
