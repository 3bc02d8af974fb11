"""The oneDNN library of the CPU backend: build, load, register with XLA:CPU, and the FFI calls.

``onednn_kernels.cc`` holds oneDNN convolutions (forward, input gradient, kernel gradient; grouped ones too) and
max-pools as XLA FFI handlers. No library of the JAX ecosystem exposes oneDNN's convolutions to JAX (jaxlib's XLA:CPU
is built without them), so :func:`build` compiles the handlers against the system's oneDNN (Debian ``libdnnl-dev``)
and jaxlib's FFI headers with ``g++``, into ``cnnjax/cpu/_lib/`` (or ``$XDG_CACHE_HOME/cnnjax`` when the package is
read-only), once per source and jaxlib version. ``python -m cnnjax.cpu`` builds it ahead of time and checks it.

Each call splits its batch into two slices that run single-threaded on the calling XLA thread and one more of XLA's
intra-op pool. bfloat16 primitives exist only where oneDNN has its AVX-512 kernels (:attr:`Library.avx512`).
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

import numpy as np

from cnnjax.errors import UsageError

SOURCE = Path(__file__).with_name("onednn_kernels.cc")
HEADER = Path("/usr/include/dnnl.hpp")
INSTALL_HINT = "install a C++ compiler and oneDNN (Debian: apt-get install g++ libdnnl-dev)"
CONV_TARGET = "cnnjax_onednn_conv"
POOL_FORWARD_TARGET, POOL_BACKWARD_TARGET = "cnnjax_onednn_max_pool_fwd", "cnnjax_onednn_max_pool_bwd"
HANDLERS = {CONV_TARGET: "CnnjaxOnednnConv", POOL_FORWARD_TARGET: "CnnjaxOnednnMaxPoolForward",
            POOL_BACKWARD_TARGET: "CnnjaxOnednnMaxPoolBackward"}
# The conv handler's `kind` attribute, and its `wgrad` attribute (how a kernel gradient is computed).
FORWARD, INPUT_GRAD, KERNEL_GRAD = 0, 1, 2
WGRAD_PATHS = {"native": 0, "forward": 1, "matmul": 2, "depthwise": 3}
# The max-pool handler keeps each window's maximum position in one byte.
MAX_POOL_WINDOW = 255


def _library_name() -> str:
    from importlib import metadata

    digest = hashlib.sha256(SOURCE.read_bytes() + metadata.version("jaxlib").encode()).hexdigest()[:16]
    return f"libcnnjax_onednn-{digest}.so"


def _library_dirs() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnjax"
    return [Path(__file__).with_name("_lib"), cache]


def compile_command(compiler: str, source: Path, output: str | Path, *flags: str) -> list[str]:
    """The command that compiles ``source`` (the handlers, or a test built around them) against jaxlib's FFI
    headers and oneDNN into ``output``; ``flags`` go before the source."""
    import jax

    return [compiler, "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", *flags, str(source), "-o", str(output),
            "-ldnnl", "-lgomp"]


def built() -> Path | None:
    """The library's path if it is built for this source and jaxlib, else None (never compiles)."""
    name = _library_name()
    return next((d / name for d in _library_dirs() if (d / name).is_file()), None)


def build(quiet: bool = True) -> Path:
    """Compile the handlers (if not built yet) and return the library's path.

    Raises a one-line :class:`UsageError` when no compiler or oneDNN header is found or compilation fails. The
    library is written under a temporary name and renamed into place: concurrent builds never see half a file."""
    if (path := built()) is not None:
        return path
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not HEADER.is_file():
        raise UsageError(f"cannot build cnnjax's oneDNN kernels: {INSTALL_HINT}")
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
            raise UsageError(f"building cnnjax's oneDNN kernels failed ({last}); {INSTALL_HINT}")
        path = directory / _library_name()
        os.replace(tmp, path)
        if not quiet:
            print(f"built {path}", file=sys.stderr)
        return path
    raise UsageError(f"cannot write cnnjax's oneDNN library ({'; '.join(errors)}); set XDG_CACHE_HOME to a writable "
                     "directory")


class Library(NamedTuple):
    """What :func:`load` found: whether the kernels run (float32), the library's path or why not, and whether
    oneDNN has its AVX-512 kernels here (then bfloat16 primitives build too)."""

    available: bool
    what: str
    avx512: bool


@functools.cache
def load() -> Library:
    """The library, built if needed, loaded and registered with XLA for the CPU (once per process)."""
    try:
        path = build()
        library = ctypes.cdll.LoadLibrary(str(path))
    except (UsageError, OSError) as e:
        return Library(False, f"no oneDNN kernels ({e})", False)
    import jax

    for target, handler in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, handler)), platform="cpu")
    avx512 = bool(library.CnnjaxOnednnBf16())
    return Library(True, f"oneDNN ({path}{'' if avx512 else '; float32 only: no AVX-512'})", avx512)


def runs(dtype) -> bool:
    """Whether the kernels run ``dtype`` here: float32 once loaded, bfloat16 where oneDNN has AVX-512 kernels."""
    library = load()
    name = getattr(dtype, "name", str(dtype))
    return library.available and (name == "float32" or (name == "bfloat16" and library.avx512))


def _int_attrs(**values: int) -> dict:
    return {k: np.int64(v) for k, v in values.items()}


def conv_call(kind: int, a, b, out_shape: tuple[int, ...], strides, pads, dilation, wgrad: str = "native",
              groups: int = 1):
    """One call of the conv handler: ``kind`` FORWARD ``(x, kernel)``, INPUT_GRAD ``(g, kernel)`` or KERNEL_GRAD
    ``(x, g)`` (by the ``wgrad`` path: 'forward' and 'matmul' for stride-1 undilated groups-1 convs, 'depthwise' for
    depthwise ones, 'native' for any; a path that does not fit runs 'native'); NHWC activations
    ``x [N, H, W, C]``, ``g [N, H', W', O]`` and the HWIO kernel ``[kH, kW, C / groups, O]`` (``groups`` divides
    ``C`` and ``O``; output channel ``o`` in group ``o // (O / groups)``, as XLA's ``feature_group_count``), of one
    dtype; result ``out_shape``."""
    import jax

    call = jax.ffi.ffi_call(CONV_TARGET, jax.ShapeDtypeStruct(out_shape, a.dtype), vmap_method="sequential")
    return call(a, b, **_int_attrs(kind=kind, wgrad=WGRAD_PATHS[wgrad], sh=strides[0], sw=strides[1],
                                   pt=pads[0][0], pb=pads[0][1], pl=pads[1][0], pr=pads[1][1], dh=dilation[0],
                                   dw=dilation[1], groups=groups))


def _pool_attrs(window, stride, pads) -> dict:
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, stride, pads
    return _int_attrs(kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr)


def max_pool_forward_call(x, out_shape: tuple[int, ...], window, stride, pads):
    """``x [N, H, W, C] -> (y out_shape, workspace uint8 out_shape)``: each window's max and its position (windows
    of at most :data:`MAX_POOL_WINDOW` positions); ``pads`` ``((top, bottom), (left, right))`` of ``-inf``."""
    import jax

    outs = (jax.ShapeDtypeStruct(out_shape, x.dtype), jax.ShapeDtypeStruct(out_shape, np.uint8))
    return jax.ffi.ffi_call(POOL_FORWARD_TARGET, outs, vmap_method="sequential")(x, **_pool_attrs(window, stride, pads))


def max_pool_backward_call(g, workspace, in_shape: tuple[int, ...], window, stride, pads):
    """``(g [N, Ho, Wo, C], workspace) -> dx in_shape``: each gradient to its window's (first) maximum."""
    import jax

    call = jax.ffi.ffi_call(POOL_BACKWARD_TARGET, jax.ShapeDtypeStruct(in_shape, g.dtype), vmap_method="sequential")
    return call(g, workspace, **_pool_attrs(window, stride, pads))
