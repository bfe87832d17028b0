"""``dimat model show MODEL [--input-shape C,H,W]``: the permutation groups dimat derives for a model.

MODEL is a zoo name (``dimat model show cnn``) or ``package.module:factory`` (called as
``factory(num_classes, width=..., in_channels=..., image_size=...)``, as in a config's ``model.name``). The listing
gives every group with its size, unit structure, tensor axes and activation sites, what is frozen and why, and the
coverage: the share of hidden-unit parameters that merges can align.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from dimat.errors import UserError

HELP = "show the permutation groups dimat derives for a model (what merges align, what is frozen and why)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="derive and print a model's permutation groups and coverage",
                          description="Derive the permutation groups of MODEL on a random example input and print "
                                      "them: size, unit structure, tensor axes, activation sites, frozen groups "
                                      "with their reasons, and the coverage.")
    show.add_argument("model", metavar="MODEL", help="zoo name or package.module:factory")
    show.add_argument("--input-shape", default="3,32,32", metavar="SHAPE",
                      help="shape of one input sample, e.g. 3,32,32 (default) or 16 for a sequence of 16 tokens")
    show.add_argument("--classes", type=int, default=10, help="number of output classes (default 10)")
    show.add_argument("--width", type=float, default=1.0, help="width multiplier passed to the factory (default 1)")
    show.add_argument("--tokens", type=int, default=None, metavar="V",
                      help="feed integer token ids in [0, V) instead of random floats (language models)")
    show.set_defaults(_model_main=_show)


def main(args: argparse.Namespace) -> int:
    return int(args._model_main(args) or 0)


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input-shape: expected positive integers like 3,32,32, got {text!r}")
    return shape


def _show(args: argparse.Namespace) -> int:
    import torch

    from dimat import models
    from dimat.merge.structure import derive

    shape = _shape(args.input_shape)
    if args.classes < 1:
        raise UserError(f"--classes: must be >= 1, got {args.classes}")
    in_channels = shape[0] if len(shape) == 3 else 1
    image_size = shape[-1] if len(shape) >= 2 else 32
    model = models.build(args.model, args.classes, width=args.width, in_channels=in_channels, image_size=image_size)
    torch.manual_seed(0)
    if args.tokens is not None:
        if args.tokens < 1:
            raise UserError(f"--tokens: must be >= 1, got {args.tokens}")
        x = torch.randint(0, args.tokens, (2,) + shape)
    else:
        x = torch.randn((2,) + shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise UserError(f"model {args.model!r} cannot run on inputs of shape {(2,) + shape} "
                        f"({' '.join(str(e).split())[:200]}); give --input-shape (and --tokens for token ids)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = derive(model, x)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({type(model).__name__}, {params} parameters), example input {tuple(x.shape)}")
    print(spec.describe())
    for w in caught:
        if not any(str(w.message).endswith(n) for n in spec.warnings):
            print(f"dimat: warning: {w.message}", file=sys.stderr)
    return 0
