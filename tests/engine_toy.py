"""A tiny stand-in task for the engine tests, also runnable as a script (subprocess / torchrun).

    python tests/engine_toy.py OUTPUT NAME [--resume auto] [--sleep S] [key=value ...]

It has every source of randomness a real task has: shuffled order, per-sample random
augmentation (noise), dropout and mixup in the main process, so exact-resume tests mean something.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from mvitv2.engine import BadSample, MixCriterion, Task, TrainConfig, Trainer, evaluate_classifier

NUM_CLASSES = 3


class ToyData(Dataset):
    """Gaussian blobs; ``noise`` is the augmentation. ``nan_index``/``bad_index`` inject faults."""

    def __init__(self, n: int, seed: int, noise: float, nan_index: int = -1, bad_index: int = -1):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % NUM_CLASSES
        centres = torch.randn(NUM_CLASSES, 8, generator=torch.Generator().manual_seed(123)) * 2
        self.x = centres[self.y] + torch.randn(n, 8, generator=g)
        self.noise, self.nan_index, self.bad_index = noise, nan_index, bad_index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i == self.bad_index:
            raise BadSample(f"toy/{i}.bin", "corrupt for the test")
        x = self.x[i] + self.noise * torch.randn(8)
        if i == self.nan_index:
            x = torch.full_like(x, math.nan)
        return x, self.y[i]


class ToyModel(nn.Module):
    def __init__(self, dropout: float = 0.0, hidden: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        self.fc1, self.drop = nn.Linear(8, hidden), nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 3)
        self.bn = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.scale = nn.Parameter(torch.ones(hidden))  # 1-D: must get no weight decay
        self.table = nn.Parameter(torch.zeros(4, 4))  # named by no_weight_decay()
        self.checkpointing = False

    def no_weight_decay(self) -> set[str]:
        return {"table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.bn(self.fc1(x))) * self.scale + self.table.sum()
        return self.fc2(self.drop(h))


class ToyTask(Task):
    """``cfg.data``: n_train, n_val, noise, dropout, hidden, batchnorm, nan_index, bad_index,
    sleep."""

    def build_datasets(self):
        d = self.cfg.data
        train = ToyData(
            d.get("n_train", 96),
            0,
            d.get("noise", 0.3),
            d.get("nan_index", -1),
            d.get("bad_index", -1),
        )
        val = ToyData(d.get("n_val", 30), 1, 0.0)
        c = self.cfg
        self.mix = MixCriterion(
            NUM_CLASSES,
            mixup=c.mixup,
            cutmix=0.0,
            prob=c.mix_prob,
            label_smoothing=c.label_smoothing,
        )
        return train, val

    def build_model(self):
        d = self.cfg.data
        return ToyModel(d.get("dropout", 0.0), d.get("hidden", 16), d.get("batchnorm", False))

    def training_loss(self, model, batch):
        if self.cfg.data.get("sleep"):
            time.sleep(self.cfg.data["sleep"])
        x, y = batch
        # MixUp wants image-like inputs: mix the feature vectors as (B, 1, 1, 8) "images".
        x4, targets = self.mix(x[:, None, None, :], y)
        return MixCriterion.loss(model(x4[:, 0, 0]), targets), {}

    def evaluate(self, model, loader, dist):
        return evaluate_classifier(model, loader, dist)

    def checkpoint_meta(self):
        return {"task": "toy", "classes": ["a", "b", "c"]}


BASE = [
    "epochs=3",
    "batch_size=16",
    "base_lr=0.05",
    "lr_ref_batch=16",
    "warmup_epochs=1",
    "min_lr=0.001",
    "workers=0",
    "tensorboard=false",
    "progress=false",
    "mixup=0.0",
    "cutmix=0.0",
    "label_smoothing=0.1",
    "seed=3",
]


def toy_config(output: str, name: str, *overrides: str) -> TrainConfig:
    """The toy run's config: :data:`BASE` then ``overrides``."""
    return TrainConfig.load(None, [*BASE, f"output={output}", f"name={name}", *overrides])


def main(argv: list[str]) -> int:
    output, name, rest = argv[0], argv[1], argv[2:]
    resume = None
    if "--resume" in rest:
        i = rest.index("--resume")
        resume = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    cfg = toy_config(output, name, *rest)
    trainer = Trainer(ToyTask(cfg), cfg, resume=resume)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"done top1={metrics['top1']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
