"""Packaging promises: ``import cnnjax`` pulls in neither TensorFlow nor torch."""

import subprocess
import sys


def test_import_cnnjax_needs_neither_tensorflow_nor_torch():
    code = (
        "import sys, cnnjax, cnnjax.models, cnnjax.layers, cnnjax.analysis, cnnjax.port, cnnjax.data\n"
        "import cnnjax.train.loop, cnnjax.train.plots, cnnjax.distributed, cnnjax.transfer, cnnjax.checkpoint\n"
        "cnnjax.data.load('stripes')\n"
        "bad = [m for m in ('tensorflow', 'torch', 'tensorflow_datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
