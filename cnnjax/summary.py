"""CLI: ``python -m cnnjax.summary MODEL [--input H,W,C] [--num-classes N]`` prints a layer table.

The last line is ``Total params: N`` (with thousands separators).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence

from cnnjax import models
from cnnjax.analysis import summary


def parse_shape(text: str) -> tuple[int, int, int]:
    """``'224,224,3' -> (224, 224, 3)``; one clear error otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input must be H,W,C with positive integers (e.g. 224,224,3), got {text!r}")
    return shape  # type: ignore[return-value]


def parse_kwargs(items: Sequence[str]) -> dict:
    """``['conv1_padding=2'] -> {'conv1_padding': 2}`` (values read as Python literals)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --kw expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.summary", description=__doc__)
    parser.add_argument("model", help=f"one of: {', '.join(models.available())}")
    parser.add_argument("--input", type=parse_shape, default=None, help="input H,W,C (default: the model's own)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, e.g. --kw conv1_padding=2 (repeatable)")
    args = parser.parse_args(argv)
    try:
        model = models.create(args.model, num_classes=args.num_classes, **parse_kwargs(args.kw))
        shape = args.input or models.DEFAULT_INPUT_SHAPES[args.model]
        print(summary(model, shape, name=args.model))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
