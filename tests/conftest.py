"""Test set-up: fp32 at highest matmul precision, deterministic torch, shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
