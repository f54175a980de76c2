"""The process-group helpers by value: what torchrun's environment gives, the single-process
fallbacks, and every collective in a real two-process gloo group (forked CPU processes)."""

from __future__ import annotations

import datetime
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mvitv2.engine import distributed as dist_module
from mvitv2.engine.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    sync_batchnorm,
    wrap_ddp,
)
from mvitv2.errors import UserError
from test_distributed import _free_port

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ---------------------------------------------------------------------- init_distributed
@pytest.fixture
def group(monkeypatch) -> list[dict]:
    """No torchrun variables, no CUDA, no process group; records each ``init_process_group`` call
    (its keyword arguments) and each CUDA device selected (as ``set_device``)."""
    calls: list[dict] = []
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append({"set_device": dev}))
    monkeypatch.setattr(dist_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_module.dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def test_without_torchrun_variables_a_run_is_rank_0_of_1_on_the_cpu_and_joins_no_group(group):
    for device in ("auto", "cpu"):
        assert init_distributed(device) == DistInfo(0, 1, 0, torch.device("cpu"))
    assert group == []


def test_torchruns_variables_give_rank_world_and_local_rank_and_a_gloo_group_on_the_cpu(
    group, monkeypatch
):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    info = init_distributed("auto")
    assert info == DistInfo(rank=5, world_size=6, local_rank=2, device=torch.device("cpu"))
    assert (info.is_main, info.distributed) == (False, True)
    assert group == [{"backend": "gloo", "device_id": None}]


def test_with_cuda_the_local_rank_selects_the_gpu_of_an_nccl_group(group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpu = torch.device("cuda", 1)
    for device in ("auto", "cuda"):
        group.clear()
        assert init_distributed(device) == DistInfo(3, 4, 1, gpu)
        assert group == [{"set_device": gpu}, {"backend": "nccl", "device_id": gpu}]
    group.clear()
    assert init_distributed("cpu") == DistInfo(3, 4, 1, torch.device("cpu"))  # asked for
    assert group == [{"backend": "gloo", "device_id": None}]


def test_one_process_on_a_gpu_selects_gpu_0_and_joins_no_group(group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("auto", None):  # None: the default, auto
        group.clear()
        info = init_distributed() if device is None else init_distributed(device)
        assert info == DistInfo(0, 1, 0, torch.device("cuda", 0))
        assert group == [{"set_device": torch.device("cuda", 0)}]


def test_a_process_group_already_joined_is_not_joined_again(group, monkeypatch):
    monkeypatch.setattr(dist_module.dist, "is_initialized", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert init_distributed("cpu") == DistInfo(0, 2, 0, torch.device("cpu"))
    assert group == []


def test_device_cuda_without_cuda_is_a_user_error_saying_what_to_use(group):
    with pytest.raises(UserError) as e:
        init_distributed("cuda")
    assert str(e.value) == (
        "device=cuda asked for but CUDA is not available here; use device=cpu or device=auto"
    )
    assert group == []


def test_leaving_without_a_process_group_does_nothing():
    assert not torch.distributed.is_initialized()
    cleanup_distributed()  # destroy_process_group would raise: there is no default group


# ---------------------------------------------------------------------- one process
def test_one_process_collectives_return_this_processs_values():
    one = DistInfo()
    x = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    total = one.all_reduce_sum(x)
    assert total.dtype == torch.float64 and total.tolist() == [1.5, -2.0]
    assert not total.requires_grad
    total.add_(1)  # a new tensor: the caller's is untouched
    assert x.tolist() == [1.5, -2.0]
    assert one.all_reduce_sum(torch.tensor([3, 4])).dtype == torch.float64
    on_meta = DistInfo(device=torch.device("meta")).all_reduce_sum(x)  # on this process's device
    assert (on_meta.device.type, on_meta.dtype) == ("meta", torch.float64)

    metrics = {"b": 2.0, "a": 1.0}
    mean = one.all_reduce_mean(metrics)
    assert mean == metrics and mean is not metrics
    assert one.all_reduce_mean({}) == {}
    assert one.all_true(True) and not one.all_true(False)
    assert one.all_true(torch.tensor(True)) and not one.all_true(torch.tensor(False))
    obj = {"x": [1]}
    assert one.all_gather_object(obj) == [obj] and one.all_gather_object(obj)[0] is obj
    assert one.broadcast_object(obj) is obj
    one.barrier()  # no group: returns at once


# ---------------------------------------------------------------------- two processes
def _collectives(rank: int) -> dict:
    """Rank ``rank`` of 2: joins the gloo group torchrun's variables describe, runs each
    collective on rank-dependent values, leaves the group; returns what it got (as JSON has it)."""
    d = init_distributed("cpu")
    try:
        mine = torch.tensor([1.0, 2.0], dtype=torch.float64) * (10**rank)  # [1, 2] and [10, 20]
        got: dict = {"info": [d.rank, d.world_size, d.local_rank, str(d.device)]}
        total = d.all_reduce_sum(mine)
        got["sum"] = [total.tolist(), str(total.dtype), mine.tolist()]
        got["sum_int"] = str(d.all_reduce_sum(torch.tensor([rank])).dtype)
        # The same keys, inserted in a different order on each process; 1/3: averaged in float64.
        metrics = {"loss": 1 / 3 + rank, "top1": 10.0 * rank}
        got["mean"] = d.all_reduce_mean(metrics if rank == 0 else dict(reversed(metrics.items())))
        got["true"] = [d.all_true(True), d.all_true(rank == 0), d.all_true(torch.tensor(rank < 5))]
        got["gather"] = d.all_gather_object({"rank": rank, "files": [f"r{rank}.bin"] * (rank + 1)})
        got["broadcast"] = d.broadcast_object(f"from rank {rank}")
        d.barrier()
        bn, note = sync_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), d)
        got["bn"] = [type(bn[1]).__name__, note]
        got["ddp"] = _ddp_step(d, rank)
    finally:
        cleanup_distributed()
    got["left"] = torch.distributed.is_initialized()
    return json.loads(json.dumps(got))


class _ClassToken(nn.Module):
    """A class token prepended to the tokens, then a linear layer (bias-free)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 2))
        self.lin = nn.Linear(2, 2, bias=False)
        nn.init.ones_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1))


def _ddp_step(d: DistInfo, rank: int) -> dict:
    """One backward of a wrapped model at one sample per process, rank ``r``'s three tokens all
    ``r + 1``: the averaged gradients, the class token's strides and DDP's warnings."""
    model = wrap_ddp(_ClassToken(), d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.full((1, 3, 2), rank + 1.0)).sum().backward()
    cls = model.module.cls
    return {
        "lin": model.module.lin.weight.grad.tolist(),
        "cls": [cls.grad.tolist(), list(cls.grad.stride()), list(cls.stride())],
        "warnings": [str(w.message).split(".")[0] for w in caught],
    }


def test_wrap_ddp_puts_a_gpu_process_on_its_own_gpu_and_a_cpu_process_on_none(monkeypatch):
    built = []
    monkeypatch.setattr(
        dist_module, "DistributedDataParallel", lambda m, device_ids: built.append(device_ids)
    )
    for device in (torch.device("cuda", 1), torch.device("cpu")):
        wrap_ddp(nn.Linear(2, 2), DistInfo(rank=1, world_size=2, local_rank=1, device=device))
    assert built == [[1], None]


def _rank_1(out: str) -> None:
    """The forked second process: rank 1 of the test's group; writes what it got to ``out``."""
    os.environ.update(RANK="1", LOCAL_RANK="1")
    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(_collectives(1)))


def test_two_processes_sum_average_agree_gather_and_broadcast_across_a_gloo_group(
    tmp_path, monkeypatch
):
    """Rank 0 is this process (so that mutation testing sees which functions the test runs), rank
    1 a forked one; a process that hangs fails the test after a minute (the group's timeout)."""
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    join = dist_module.dist.init_process_group
    monkeypatch.setattr(
        dist_module.dist,
        "init_process_group",
        lambda **kw: join(**kw, timeout=datetime.timedelta(seconds=60)),
    )
    # fork: the process starts with torch imported (spawn would take several seconds more).
    other = mp.get_context("fork").Process(target=_rank_1, args=(str(tmp_path / "rank1.json"),))
    other.start()
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            first = _collectives(0)
        finally:
            torch.set_num_threads(threads)
        other.join(60)
    finally:
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0
    got = [first, json.loads((tmp_path / "rank1.json").read_text())]
    for rank, g in enumerate(got):
        assert g["info"] == [rank, 2, rank, "cpu"]
        mine = [1.0 * 10**rank, 2.0 * 10**rank]
        assert g["sum"] == [[11.0, 22.0], "torch.float64", mine]  # the caller's tensor kept
        assert g["sum_int"] == "torch.float64"
        assert g["mean"] == {"loss": (1 / 3 + (1 / 3 + 1)) / 2, "top1": (0.0 + 10.0) / 2}
        assert g["true"] == [True, False, True]
        assert g["gather"] == [
            {"rank": 0, "files": ["r0.bin"]},
            {"rank": 1, "files": ["r1.bin", "r1.bin"]},
        ]
        assert g["broadcast"] == "from rank 0"
        assert g["bn"] == [
            "BatchNorm1d",
            "1 BatchNorm layer(s) keep per-process batch statistics: torch's SyncBatchNorm "
            "has no CPU kernels",
        ]
        assert g["left"] is False
        # d(sum)/dW[j, k] = sum of the tokens' k-th values: 3 * (r + 1) on rank r, averaged 4.5;
        # d(sum)/dcls[k] = sum_j W[j, k] = 2. The class token's gradient (a slice of the tokens'
        # gradient at batch 1) has the parameter's strides, so DDP does not warn.
        assert g["ddp"]["lin"] == [[4.5, 4.5], [4.5, 4.5]]
        assert g["ddp"]["cls"] == [[[[2.0, 2.0]]], [2, 2, 1], [2, 2, 1]]
        assert g["ddp"]["warnings"] == []


# ---------------------------------------------------------------------- sync_batchnorm
def _three_norms() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(2), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), nn.BatchNorm3d(2)
    )


def test_batchnorm_of_every_dimension_is_counted_and_kept_on_cpu_processes():
    model = _three_norms()
    same, note = sync_batchnorm(model, DistInfo(rank=1, world_size=2))
    assert same is model
    assert note == (
        "3 BatchNorm layer(s) keep per-process batch statistics: torch's SyncBatchNorm has no "
        "CPU kernels"
    )


def test_batchnorm_of_every_dimension_becomes_syncbatchnorm_on_gpu_processes():
    gpus = DistInfo(rank=0, world_size=4, device=torch.device("cuda", 0))
    converted, note = sync_batchnorm(_three_norms(), gpus)
    assert note == "3 BatchNorm layer(s) converted to SyncBatchNorm (global batch statistics)"
    kinds = [type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__]
    assert kinds == ["SyncBatchNorm"] * 3


def test_no_conversion_and_no_note_for_one_process_or_a_model_without_batchnorm():
    gpus = DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    for model, info in (
        (_three_norms(), DistInfo()),
        (_three_norms(), DistInfo(device=torch.device("cuda", 0))),
        (nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), gpus),
        (nn.Sequential(nn.Linear(2, 2)), DistInfo(rank=0, world_size=2)),
    ):
        same, note = sync_batchnorm(model, info)
        assert same is model and note is None
