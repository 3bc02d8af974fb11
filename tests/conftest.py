"""Test set-up: fp32 at highest matmul precision, deterministic torch, the tests' own compilation cache, shared
helpers."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# The entry points the tests start share one compilation cache of their own, not the user's (a later run of a
# program loads it instead of compiling it again); the cache's own tests give theirs a fresh directory.
os.environ.setdefault("CNNJAX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "cnnjax-tests-jax-compilation"))

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.onednn_marks import PATHS, library, use_path  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The plain XLA path (what GPUs and TPUs run) or the CPU backend (skipped where it is not built), for
    functions traced in the test (``CNNJAX_CPU_BACKEND`` is read at trace time)."""
    use_path(monkeypatch, request.param)
    if request.param == "cpu":
        library()
    return request.param


@pytest.fixture(autouse=True)
def _signal_handlers_restored(request):
    """Every test starts with the SIGINT / SIGTERM handlers the previous one started with: a test (or library
    code it runs in-process) that leaves its own handler installed is named in a warning and undone, so a later
    test of signal behaviour does not inherit it (with pytest-xdist the order of files differs run to run)."""
    import signal
    import warnings

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if signal.getsignal(sig) is not handler:
            warnings.warn(f"{request.node.nodeid} left {sig.name} handled by {signal.getsignal(sig)!r}; restored",
                          stacklevel=1)
            signal.signal(sig, handler)


def pytest_terminal_summary(terminalreporter):
    """Print every measured parity max |Δ| so runs document their figures."""
    from tests.parity import REPORT

    if REPORT:
        terminalreporter.section("parity max |Δ| (cnnjax vs torch, fp32)")
        for label in sorted(REPORT):
            terminalreporter.write_line(f"{label:60s} {REPORT[label]:.3e}")


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its parity figures to the controller (see below)."""
    from tests.parity import REPORT

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["parity"] = dict(REPORT)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: collect each worker's parity figures for the summary."""
    from tests.parity import REPORT

    REPORT.update(getattr(node, "workeroutput", {}).get("parity", {}))


# test_models.py's models that also run at 224x224 on plain XLA (test_family_parity_at_imagenet_size).
AT_IMAGENET_SIZE = ("vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2")


def pytest_collection_modifyitems(items):
    """A family's reduced-size parity runs on both paths; its plain-XLA run is under ``-m slow`` by default where the
    family's 224x224 run is on that path already (``tests/test_zoo_*.py``, and the models of AT_IMAGENET_SIZE)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("path") != "xla":
            continue
        zoo_odd_size = item.path.name.startswith("test_zoo_") and "odd_size" in item.name
        imagenet_family = item.path.name == "test_models.py" and item.originalname == "test_model_parity_with_torch" \
            and params.get("name") in AT_IMAGENET_SIZE
        if zoo_odd_size or imagenet_family:
            item.add_marker(pytest.mark.slow)
