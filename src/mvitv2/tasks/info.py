"""``mvitv2 info``: list the variants with parameters and FLOPs, and run one real forward."""

from __future__ import annotations

import argparse
import time

import torch

from mvitv2.models import create_model, get_config, list_models
from mvitv2.utils.flops import count_macs, count_params


def default_input_shape(name: str) -> tuple[int, ...]:
    """The training input shape of a variant: ``(1, 3, H, W)`` or ``(1, 3, T, H, W)``."""
    cfg = get_config(name)
    h, w = cfg.image_hw
    return (1, cfg.in_chans, cfg.num_frames, h, w) if cfg.temporal else (1, cfg.in_chans, h, w)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", help="only models whose name contains this")
    parser.add_argument(
        "--forward", default="mvitv2_tiny", help="model to run one real forward with ('' to skip)"
    )


def run(args: argparse.Namespace) -> int:
    print(f"{'model':<20} {'params (M)':>11} {'GMACs':>9}  input")
    for name in list_models(args.filter):
        shape = default_input_shape(name)
        with torch.device("meta"):
            model = create_model(name)
        print(
            f"{name:<20} {count_params(model) / 1e6:>11.2f} "
            f"{count_macs(model, shape) / 1e9:>9.2f}  {'x'.join(map(str, shape[1:]))}"
        )
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
