"""Port torchvision weights into an orbax checkpoint that evaluate / predict / transfer restore.

``python -m experiments.port --arch resnet50 --weights FILE --out DIR`` (FILE: .pth/.pt or
.safetensors), or ``--download`` to fetch the official torchvision file (sha256-checked) when
the machine is online.
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first step below comes before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.install()

import hashlib
import os
import sys
import urllib.error
import urllib.request

from absl import flags

from cnnjax.errors import MissingFileError, UsageError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "a torchvision classification model name (resnet50, mobilenet_v3_large, "
                                  "efficientnet_b0, convnext_tiny, ...; the README's model table)")
flags.DEFINE_string("weights", None, "torchvision state dict (.pth / .pt / .safetensors)")
flags.DEFINE_string("out", None, "output directory (orbax checkpoint + config.json)")
flags.DEFINE_bool("download", False, "download the official torchvision ImageNet weights")
flags.DEFINE_string("cache_dir", "~/.cache/torch/hub/checkpoints", "where --download keeps the file")


def download(arch: str, cache_dir: str) -> str:
    """Fetch torchvision's weights for ``arch`` into ``cache_dir`` and check the sha256 prefix in its name."""
    from cnnjax.port.torchvision import WEIGHT_FILES, WEIGHTS_BASE_URL

    if arch not in WEIGHT_FILES:
        raise UsageError(f"no official weight file is known for {arch!r}; pass --weights FILE")
    name = WEIGHT_FILES[arch]
    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, name)
    want = name.rsplit("-", 1)[1].split(".")[0]
    if not os.path.exists(path):
        from cnnjax.io import atomic_write

        try:
            with urllib.request.urlopen(WEIGHTS_BASE_URL + name, timeout=30) as response, \
                    atomic_write(path, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            raise MissingFileError(f"could not download {name} ({err}); this machine looks offline — fetch the "
                                    f"file elsewhere and pass --weights FILE") from None
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if not digest.startswith(want):
        raise UsageError(f"{path} has sha256 {digest[:8]}..., expected {want}...: delete it and download again")
    return path


def main(argv):
    del argv
    from cnnjax import checkpoint
    from cnnjax.io import write_json_atomic
    from cnnjax.port import convert, read_state_dict
    from cnnjax.port.torchvision import ARCHS, ported_kwargs, renamed_legacy_keys

    if not FLAGS.arch or not FLAGS.out:
        raise UsageError("--arch and --out are required")
    if bool(FLAGS.weights) == FLAGS.download:
        raise UsageError("pass exactly one of --weights FILE or --download")
    path = download(FLAGS.arch, FLAGS.cache_dir) if FLAGS.download else FLAGS.weights
    if FLAGS.arch not in ARCHS:
        raise UsageError(f"unknown --arch {FLAGS.arch!r}; choose one of: {', '.join(ARCHS)}")
    state_dict = renamed_legacy_keys(read_state_dict(path))
    kwargs = ported_kwargs(FLAGS.arch, state_dict)
    model, variables = convert(FLAGS.arch, state_dict, kwargs)  # strict: fails before anything is written
    if checkpoint.steps(FLAGS.out):
        raise UsageError(f"{FLAGS.out} already holds checkpoints; choose a new --out")
    os.makedirs(FLAGS.out, exist_ok=True)
    num_classes = model.num_classes
    write_json_atomic(os.path.join(FLAGS.out, "config.json"), {
        "model": {"name": FLAGS.arch, "kwargs": kwargs}, "num_classes": num_classes,
        "data": {"name": "imagenet", "source_weights": os.path.abspath(path)}})
    checkpoint.save(FLAGS.out, 0, variables, {"epoch": 0, "ported_from": os.path.abspath(path)})
    n = sum(int(v.size) for v in __import__("jax").tree_util.tree_leaves(variables["params"]))
    print(f"ported {FLAGS.arch} ({n:,} params, {num_classes} classes) from {path} to {FLAGS.out}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
