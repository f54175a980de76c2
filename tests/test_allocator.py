"""The command line makes glibc keep freed memory for reuse (fewer page faults on large tensors),
says so, and leaves the allocator alone when asked or when it is not glibc."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from mvitv2 import cli
from mvitv2.utils import allocator


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_keep_freed_memory_turns_off_mmap_and_trimming(monkeypatch):
    monkeypatch.delenv("MVITV2_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "_setting", "default")
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc) == allocator.KEEP == allocator.allocator_setting()
    # glibc's malloc.h: M_MMAP_MAX is -4, M_TRIM_THRESHOLD is -1; -1 as a threshold = never trim
    assert libc.calls == [(-4, 0), (-1, -1)]


def test_the_allocator_is_left_alone_when_asked_or_when_mallopt_fails(monkeypatch):
    monkeypatch.setattr(allocator, "_setting", "default")
    monkeypatch.setenv("MVITV2_MALLOC", "default")
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc) == "default (MVITV2_MALLOC=default)"
    assert libc.calls == []
    monkeypatch.delenv("MVITV2_MALLOC")
    assert allocator.keep_freed_memory(FakeLibc(result=0)) == "default (mallopt failed)"
    assert allocator.allocator_setting() == "default (mallopt failed)"


@pytest.mark.parametrize(
    ("platform_name", "libc_name", "want"),
    [
        ("linux", ("glibc", "2.39"), allocator.KEEP),
        ("linux", ("", ""), "default (not glibc)"),  # e.g. musl: platform.libc_ver() is empty
        ("darwin", ("glibc", "2.39"), "default (not glibc)"),
    ],
)
def test_keep_freed_memory_calls_the_process_s_glibc_and_leaves_other_c_libraries_alone(
    monkeypatch, platform_name, libc_name, want
):
    """Without a ``libc`` argument: the process's own C library (``ctypes.CDLL(None)``) on Linux
    with glibc; nothing on another system or C library."""
    monkeypatch.delenv("MVITV2_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "_setting", "default")
    monkeypatch.setattr(allocator, "sys", SimpleNamespace(platform=platform_name))
    monkeypatch.setattr(allocator, "platform", SimpleNamespace(libc_ver=lambda: libc_name))
    opened, libc = [], FakeLibc()
    monkeypatch.setattr(
        allocator, "ctypes", SimpleNamespace(CDLL=lambda name: opened.append(name) or libc)
    )
    assert allocator.keep_freed_memory() == want == allocator.allocator_setting()
    if want == allocator.KEEP:
        assert opened == [None] and libc.calls == [(-4, 0), (-1, -1)]
    else:
        assert opened == [] and libc.calls == []


def test_the_command_line_sets_the_allocator_before_running_a_command(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: seen.append("set"))
    assert cli.main(["info", "--weights", "--filter", "mvitv2_tiny"]) == 0
    assert seen == ["set"]
    # the console script: main() reads the command from sys.argv
    monkeypatch.setattr(sys, "argv", ["mvitv2", "info", "--weights", "--filter", "mvitv2_tiny"])
    assert cli.main() == 0
    assert seen == ["set", "set"]


_FAULTS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from mvitv2.utils.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():  # like a layer: large temporaries made, used and freed (16 + 48 + 48 MiB)
        a = torch.ones(1 << 22)
        b = torch.ones(3 << 22)
        return float((a.repeat(3) + b)[-1])
    for _ in range(5):  # warm-up: glibc's heap settles after a few steps
        step()
    counts = []
    for _ in range(5):
        before = faults()
        step()
        counts.append(faults() - before)
    print(min(counts))
    """
)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_a_step_s_large_temporaries_reuse_freed_pages_instead_of_faulting_in_new_ones():
    """112 MiB of temporaries = 28,672 pages of 4 KiB. glibc's default serves blocks above
    32 MiB with fresh pages each step (a fault per page: 36,867 measured on the Xeon); with
    freed memory kept, a step in the steady state faults no page in.

    Counted as the fewest faults of 5 steps after 5 warm-up steps: how many steps the kept heap
    takes to settle varies from run to run (on the Xeon 4 of 30 runs still faulted one 48 MiB
    block, 12,288 pages, in the 6th step), while the default faults in every step."""
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["default"] >= 24576 // 2  # the two 48 MiB blocks, even with some huge pages
    assert counts["keep"] < 1000
