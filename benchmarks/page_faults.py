"""Page faults and time per call of ours and the reference, with the C allocator as the command
line sets it (freed memory kept) or as glibc leaves it (``MVITV2_MALLOC=default``).

    uv run python benchmarks/page_faults.py --case image_fp32 [--threads 1] [--calls 4]
    MVITV2_MALLOC=default uv run python benchmarks/page_faults.py --case train

Cases as in ``benchmarks/op_profile.py`` (its ``build_case``): ``image_fp32`` (MViTv2-T b8 224
inference vs timm), ``train`` (MViTv2-T b16 fwd+bwd+AdamW vs timm) and ``detect`` (the
detection backbone at 1024 vs the unfused path). Each model runs ``--calls`` times after three
warm-up calls (the kept heap settles in a few calls); printed per call: minor page faults
(``getrusage``) and milliseconds, then the medians.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from op_profile import build_case  # (benchmarks/ is the script's folder)

from mvitv2.utils.allocator import allocator_setting, keep_freed_memory


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("image_fp32", "train", "detect"), default="image_fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calls", type=int, default=4)
    args = p.parse_args(argv)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    fns, _ = build_case(args.case, quick=False, batch=None)  # op_profile's models and inputs
    print(f"{args.case}, {torch.get_num_threads()} thread(s), allocator: {allocator_setting()}")
    for _ in range(3):
        for fn in fns.values():
            fn()
    seen = {name: ([], []) for name in fns}
    for i in range(args.calls):  # alternating, the order swapped every call
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            f0, t0 = _faults(), time.perf_counter()
            fns[name]()
            seen[name][0].append(_faults() - f0)
            seen[name][1].append((time.perf_counter() - t0) * 1e3)
    for name, (faults, ms) in seen.items():
        print(
            f"{name:5s} faults/call {faults}  ms {[round(t) for t in ms]}  medians: "
            f"{statistics.median(faults):.0f} faults, {statistics.median(ms):.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
