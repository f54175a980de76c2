"""``mvitv2 info``: the variants with parameters and FLOPs, one real forward, and the released
weights with the accuracy their authors report.

Nothing here imports torch at module level: ``mvitv2 --help`` builds this parser.
"""

from __future__ import annotations

import argparse
import time

from mvitv2.errors import UserValueError

FORWARD_DEFAULT = "mvitv2_tiny"


def default_input_shape(name: str) -> tuple[int, ...]:
    """The training input shape of a variant: ``(1, 3, H, W)`` or ``(1, 3, T, H, W)``."""
    from mvitv2.models import get_config

    cfg = get_config(name)
    h, w = cfg.image_hw
    return (1, cfg.in_chans, cfg.num_frames, h, w) if cfg.temporal else (1, cfg.in_chans, h, w)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", help="only models and weights containing this")
    parser.add_argument(
        "--forward", default=FORWARD_DEFAULT, help="model to run one real forward with ('' to skip)"
    )
    parser.add_argument(
        "--weights", action="store_true", help="only list the released weights (fast)"
    )


def weights_lines(filter: str = "") -> list[str]:
    """One line per released weights entry whose tag contains ``filter``: tag, task, classes,
    the reported accuracy and where it was reported."""
    from mvitv2.weights import WEIGHTS

    lines = [f"{'weights tag':<38} {'task':<14} {'classes':<13} {'reported':<30} source"]
    for tag in sorted(WEIGHTS):
        if filter not in tag:
            continue
        w = WEIGHTS[tag]
        lines.append(
            f"{tag:<38} {w.task:<14} {w.classes:<13} {w.reported:<30} {w.metrics.get('source', '')}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    weights = weights_lines(args.filter)
    if args.weights:  # the registry alone: no model code, no torch ops
        if args.forward != FORWARD_DEFAULT:
            raise UserValueError(
                f"--forward {args.forward!r} with --weights: --weights lists only the released "
                "weights and runs no forward; drop one of the two"
            )
        if len(weights) == 1:
            raise UserValueError(f"--filter {args.filter!r}: no released weights tag contains it")
        print("\n".join(weights))
        return 0

    import torch

    from mvitv2.models import create_model, list_models
    from mvitv2.utils.flops import count_macs, count_params

    known = list_models()
    if args.forward and args.forward not in known:
        raise UserValueError(f"--forward {args.forward!r}: no such model; models: {known}")
    if not list_models(args.filter) and len(weights) == 1:
        raise UserValueError(
            f"--filter {args.filter!r}: no model or weights tag contains it; models: {known}"
        )
    if list_models(args.filter):
        print(f"{'model':<20} {'params (M)':>11} {'GMACs':>9}  input")
        for name in list_models(args.filter):
            shape = default_input_shape(name)
            with torch.device("meta"):
                model = create_model(name)
            print(
                f"{name:<20} {count_params(model) / 1e6:>11.2f} "
                f"{count_macs(model, shape) / 1e9:>9.2f}  {'x'.join(map(str, shape[1:]))}"
            )
        print()
    print("\n".join(weights))
    print("(create_model(name, pretrained=TAG) or mvitv2.load_checkpoint(model, TAG))")
    if args.forward:
        model = create_model(args.forward).eval()
        x = torch.randn(default_input_shape(args.forward))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(x)
        print(
            f"forward {args.forward} {tuple(x.shape)} -> {tuple(logits.shape)} "
            f"in {time.perf_counter() - start:.2f} s"
        )
    return 0
