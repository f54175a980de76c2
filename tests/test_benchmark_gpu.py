"""``benchmarks/gpu.sh`` stays runnable without a GPU to try it on: it parses, its time limits fit
the 8-minute budget, and each of its ``mvitv2 benchmark`` lines runs here in ``--quick`` mode on
the CPU (same cases and options, tiny models) and writes the rows it promises."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from mvitv2.cli import main, parse

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
BUDGET_S = 8 * 60
KILL_AFTER_S = 5  # timeout --kill-after


def _steps() -> list[tuple[str, str, int, list[str]]]:
    """``(kind, name, limit, args)`` of every ``step``/``bench`` line of the script."""
    out = []
    for line in SCRIPT.read_text().splitlines():
        m = re.match(r"(step|bench) (\w+) (\d+) (.*)$", line)
        if m:
            out.append((m[1], m[2], int(m[3]), shlex.split(m[4])))
    return out


def test_gpu_script_parses_and_its_step_limits_fit_the_budget():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    steps = _steps()
    names = [name for _, name, _, _ in steps]
    assert len(set(names)) == len(names)  # one log and one JSON per step
    assert "tests" in names and sum(kind == "bench" for kind, *_ in steps) >= 5
    assert f"--kill-after={KILL_AFTER_S}" in SCRIPT.read_text()
    assert sum(limit + KILL_AFTER_S for _, _, limit, _ in steps) <= BUDGET_S
    (tests,) = [args for _, name, _, args in steps if name == "tests"]
    assert "tests/test_device_paths.py" in tests


def _cpu_quick(args: list[str], json_path: Path) -> list[str]:
    """A benchmark line of the script as a CPU smoke run: batch 2, --quick, one repeat."""
    args = list(args)
    if "--batch" in args:
        args[args.index("--batch") + 1] = "2"
    return [
        "benchmark",
        *args,
        "--device",
        "cpu",
        "--quick",
        "--repeats",
        "1",
        "--json",
        str(json_path),
    ]


BASELINE = {
    "image_fp32": "timm",
    "image_bf16": "timm",
    "train": "timm",
    "train_bf16": "timm",
    "video_bf16": "torchvision",
    "detect": "unfused",
}
BF16_CASES = {"image_bf16", "train_bf16", "video_bf16"}


def test_every_benchmark_line_of_the_gpu_script_is_a_valid_command_line():
    for kind, name, _, args in _steps():
        if kind == "bench":  # bench adds --device cuda and --json
            assert "--device" not in args and "--json" not in args, name
            parsed = parse(["benchmark", *args, "--device", "cuda"]).args
            assert parsed.cases and parsed.device == "cuda", name


# Each line's run costs ~20 s of this CPU: the line that exercises what the other quick runs
# (test_speed_paths: image_fp32, video_bf16, detect) do not, bf16 training and compiled
# training steps, runs here.
@pytest.mark.parametrize("name", ["compile_train"])
def test_a_benchmark_line_of_the_gpu_script_runs_on_cpu_and_reports_its_rows(
    name, tmp_path, monkeypatch
):
    (args,) = [args for kind, n, _, args in _steps() if n == name]
    # inductor takes minutes on this CPU; the eager backend runs the same code paths here.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / f"{name}.json"
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core machine two spin-waiting threads take twice as long
        assert main([*_cpu_quick(args, out), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    cases = parse(["benchmark", *args]).args.cases
    compiled = "--compile" in args and "detect" not in cases
    rows = {(r["case"], r["model"]): r for r in result["rows"]}
    want = set()
    for case in cases:
        models = {"ours", BASELINE[case]}
        if compiled:
            models |= {m + "+compile" for m in models}
        want |= {(case, m) for m in models}
    assert set(rows) == want
    peaks = result["matmul_peak_gflops_per_case"]
    for (case, model), r in rows.items():
        base = rows[case, BASELINE[case]]
        assert r["speedup"] == pytest.approx(base["ms"] / r["ms"])
        assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / base["peak_mb"])
        # % of the matmul peak of the case's compute dtype, measured around the case
        peak = peaks[case]["bf16" if case in BF16_CASES else "fp32"]
        assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / peak)
        if model == "ours" and case != "train_bf16":  # same weights: same outputs / gradients
            assert r["max_abs_diff"] < (5e-2 if case in BF16_CASES else 1e-4), case
    # The recorded command line reproduces the run.
    again = parse(shlex.split(result["command"])[1:]).args
    assert again.cases == cases and again.compile == ("--compile" in args)
    assert again.device == "cpu" and again.quick and again.batch == 2 and again.threads == 1


def test_bf16_training_runs_only_when_asked_for():
    assert "train_bf16" not in parse(["benchmark"]).args.cases
    assert parse(["benchmark", "--cases", "train_bf16"]).args.cases == ["train_bf16"]


def test_cuda_peak_memory_is_the_high_water_mark_above_the_start_on_the_given_device(monkeypatch):
    """``peak_memory`` on CUDA, with torch.cuda's counters stood in for: it syncs, resets and
    reads the counters of the device it is given (not the current one) and subtracts what was
    allocated before the call."""
    from mvitv2 import benchmark

    calls = []
    counters = {"allocated": 100, "peak": 0}

    def record(name, value=None):
        def f(device=None):
            calls.append((name, device))
            return value() if value else None

        return f

    def reset(device=None):
        calls.append(("reset", device))
        counters["peak"] = counters["allocated"]

    monkeypatch.setattr(torch.cuda, "synchronize", record("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", record("allocated", lambda: 100))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", record("max", lambda: counters["peak"]))

    def fn():
        counters["peak"] = 100 + 4096  # what the call allocated at its highest

    assert benchmark.peak_memory(fn, "cuda:1") == 4096
    assert {device for _, device in calls} == {"cuda:1"}
    assert [name for name, _ in calls] == ["sync", "reset", "allocated", "sync", "max"]


def _run_script_with_fakes(
    tmp_path: Path, runner: str = "uv", fail_step: str = ""
) -> subprocess.CompletedProcess:
    """Run gpu.sh with ``runner`` (``uv``, or ``python3`` on a machine without uv) and
    ``nvidia-smi`` stood in for by scripts that log their arguments (one line per call; the
    fake python3 also logs its PYTHONPATH) and fail for the benchmark writing
    ``<fail_step>.json``. The real python3 in /usr/bin comes after the fakes on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.txt"
    (bin_dir / runner).write_text(
        "#!/bin/bash\n"
        f'echo "{runner} $*" >> {log}\n'
        f'[[ "{runner}" == python3 ]] && echo "PYTHONPATH=$PYTHONPATH" >> {log}\n'
        f'[[ -n "{fail_step}" && "$*" == *"/{fail_step}.json"* ]] && exit 3\n'
        "exit 0\n"
    )
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/bash\necho nvidia-smi >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MVITV2_GPU_OUT": str(tmp_path / "out")}
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env=env,
        cwd=SCRIPT.parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gpu_script_runs_every_step_in_order_and_reports_a_failed_one(tmp_path):
    done = _run_script_with_fakes(tmp_path / "ok")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "ok" / "calls.txt").read_text().splitlines()
    out = tmp_path / "ok" / "out"
    benches = [name for kind, name, _, _ in _steps() if kind == "bench"]
    assert calls[0] == "nvidia-smi" and calls[1].startswith("uv run python -c import torch")
    assert calls[2].startswith("uv run python -m pytest tests/test_device_paths.py")
    assert len(calls) == 3 + len(benches)
    for name, call in zip(benches, calls[3:]):
        assert call.startswith("uv run python -m mvitv2.cli benchmark --device cuda --cases ")
        assert call.endswith(f"--json {out}/{name}.json")
    assert {p.name for p in out.iterdir()} == {f"{name}.log" for _, name, _, _ in _steps()}

    done = _run_script_with_fakes(tmp_path / "fail", fail_step="detect")
    assert done.returncode == 1
    assert "=== detect: exit 3" in done.stdout and "failed steps: detect" in done.stdout
    # the steps after the failed one still ran
    assert f"{benches[-1]}.json" in (tmp_path / "fail" / "calls.txt").read_text()


def test_without_uv_the_gpu_script_runs_the_machines_python3_on_the_source_tree(tmp_path):
    """A lent GPU machine has no uv and no registry, but a CUDA torch in its python3: every step
    runs that python3 with the repository's src/ first on PYTHONPATH."""
    done = _run_script_with_fakes(tmp_path, runner="python3")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    calls, paths = lines[1::2], lines[2::2]
    benches = [name for kind, name, _, _ in _steps() if kind == "bench"]
    assert lines[0] == "nvidia-smi" and calls[0].startswith("python3 -c import torch")
    assert calls[1].startswith("python3 -m pytest tests/test_device_paths.py")
    assert [c.split(" --cases ")[0] for c in calls[2:]] == [
        "python3 -m mvitv2.cli benchmark --device cuda"
    ] * len(benches)
    assert set(paths) == {f"PYTHONPATH={SCRIPT.parents[1] / 'src'}"}
