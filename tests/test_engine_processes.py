"""Engine across processes: a SIGKILLed run resumes to the same weights; torchrun DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import engine_toy
from mvitv2.engine import read_training_checkpoint

SCRIPT = str(Path(__file__).with_name("engine_toy.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def _run(*args: str, timeout: float = 180) -> None:
    out = subprocess.run(
        [sys.executable, SCRIPT, *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _run_here(*args: str) -> None:
    """The same script in this process (saves a process start), on one thread like the others."""
    threads = torch.get_num_threads()
    try:
        assert engine_toy.main([*args, "threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_training_checkpoint(path)["model"]


def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    extra = ["epochs=4", "data.dropout=0.2", "mixup=0.4", "ckpt_every_steps=2"]
    _run_here(str(tmp_path), "full", *extra)

    # Same run, slowed down so it can be killed part-way through epoch 2.
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, str(tmp_path), "killed", *extra, "data.sleep=0.05"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.05)
    time.sleep(0.25)  # a few steps (and a mid-epoch checkpoint) into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    saved = read_training_checkpoint(tmp_path / "killed" / "last.pt")
    assert saved["epoch"] < 4, "the run finished before it was killed"

    _run(str(tmp_path), "killed", *extra, "data.sleep=0.05", "--resume", "auto")  # same experiment
    full, resumed = (
        _weights(tmp_path / "full" / "last.pt"),
        _weights(tmp_path / "killed" / "last.pt"),
    )
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    epochs = [json.loads(s)["epoch"] for s in metrics.read_text().splitlines()]
    assert epochs[-1] == 4


def test_torchrun_two_cpu_processes_train_the_same_model_as_one(tmp_path):
    common = ["epochs=2", "data.noise=0.3", "base_lr=0.05", "lr_ref_batch=16", "data.n_val=31"]
    _run_here(str(tmp_path), "one", "batch_size=16", *common)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            SCRIPT,
            str(tmp_path),
            "two",
            "batch_size=8",
            *common,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("done top1=") == 1  # only rank 0 reports
    one, two = (
        read_training_checkpoint(tmp_path / "one" / "last.pt"),
        read_training_checkpoint(tmp_path / "two" / "last.pt"),
    )
    assert two["world_size"] == 2 and two["step"] == one["step"]
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5), k
    assert abs(one["metrics"]["top1"] - two["metrics"]["top1"]) < 1e-6
    assert two["metrics"]["count"] == 31  # each val sample counted once over the 2 shards
