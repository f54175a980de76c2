"""The shipped recipes that claim the official MViTv2 recipes give the official numbers.

References: the official configs (facebookresearch/mvit, facebookresearch/SlowFast,
facebookresearch/detectron2 projects/MViTv2; file and line in each test) and timm's RandAugment,
the implementation those configs' ``AA_TYPE`` strings are parsed by.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import v2

from mvitv2.data.image import ImageDataConfig, RandAugment, build_transform
from mvitv2.engine.cli import RECIPES_DIR
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.optim import build_optimizer
from mvitv2.errors import UserValueError
from mvitv2.tasks.video import VideoDataConfig

ROTATE = v2.RandAugment._AUGMENTATION_SPACE["Rotate"][0]  # degrees per magnitude bin


def _timm_rotate(aa: str) -> tuple[float, float]:
    """(mean, std) rotation in degrees of timm's RandAugment string ``aa``."""
    op = next(o for o in rand_augment_transform(aa, {}).ops if o.name == "Rotate")
    degrees = abs(op.level_fn(op.magnitude, op.hparams)[0])
    per_level = abs(op.level_fn(op.magnitude + 1, op.hparams)[0]) - degrees
    return degrees, op.magnitude_std * per_level


def _rotate(bins: int, magnitude: float) -> float:
    """Degrees of torchvision's Rotate at (fractional) magnitude bin ``magnitude``."""
    table = ROTATE(bins, 224, 224)
    return float(table[1]) * magnitude  # linear in the bin: 0 at bin 0


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large", "huge"])
def test_in1k_recipes_randaugment_is_as_strong_as_the_official_m9_mstd05(name):
    """facebookresearch/mvit mvit/config/defaults.py:58 ``AA_TYPE = "rand-m9-n6-mstd0.5-inc1"``,
    parsed by timm-style RandAugment on a 0..10 magnitude scale (mvit/datasets/rand_augment.py:43
    ``_MAX_LEVEL = 10.0``): m9 rotates by 27 degrees, mstd 0.5 is 1.5 degrees. Our RandAugment is
    torchvision's (31 bins): the same strength is bin 27, noise 1.5 bins."""
    cfg = TrainConfig.load(RECIPES_DIR / f"in1k_{name}.yaml")
    tf = build_transform(ImageDataConfig.from_dict(cfg.data), train=True)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    want_mean, want_std = _timm_rotate("rand-m9-n6-mstd0.5-inc1")
    assert ra.ops == 6
    assert math.isclose(_rotate(ra.num_magnitude_bins, ra.mean_magnitude), want_mean)
    assert math.isclose(_rotate(ra.num_magnitude_bins, ra.magnitude_std), want_std)


@pytest.mark.parametrize(
    "name", ["k400_small", "k400_base", "k400_large", "ssv2_small", "ssv2_base"]
)
def test_video_recipes_randaugment_is_as_strong_as_the_official_m7(name):
    """SlowFast configs/Kinetics/MVITv2_S_16x4.yaml:49 (and MVITv2_B_32x3.yaml:49,
    MVITv2_L_40x3_test.yaml:50, configs/SSv2/MVITv2_S_16x4.yaml:52, MVITv2_B_32x3.yaml:52)
    ``AA_TYPE: rand-m7-n4-mstd0.5-inc1``: m7 of timm's 0..10 scale rotates by 21 degrees."""
    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    aug = VideoDataConfig.from_dict(cfg.data).transform(train=True)._augment
    ra = next(t for t in aug.transforms if isinstance(t, RandAugment))
    assert ra.ops == 4
    want, _ = _timm_rotate("rand-m7-n4-mstd0.5-inc1")
    assert math.isclose(_rotate(ra.num_magnitude_bins, ra.mean_magnitude), want)


# SlowFast's TRAIN.BATCH_SIZE is the batch of one shard (slowfast/config/defaults.py:143-144
# "Total mini-batch size", split over NUM_GPUS in slowfast/datasets/loader.py:98) and BASE_LR
# is scaled by NUM_SHARDS (defaults.py:1281-1282): the official lr per video is
# BASE_LR / TRAIN.BATCH_SIZE whatever the number of machines.
@pytest.mark.parametrize(
    ("name", "base_lr", "batch"),
    [
        # configs/Kinetics/MVITv2_S_16x4.yaml:4 BATCH_SIZE 16, :66 BASE_LR 0.0001
        ("k400_small", 1e-4, 16),
        # configs/Kinetics/MVITv2_B_32x3.yaml:4 BATCH_SIZE 16, :66 BASE_LR 0.0001
        ("k400_base", 1e-4, 16),
        # L shares S/B's solver (the paper: one Kinetics recipe; no L training config released)
        ("k400_large", 1e-4, 16),
        # configs/SSv2/MVITv2_S_16x4.yaml:4 BATCH_SIZE 16, :68 BASE_LR 0.0025
        ("ssv2_small", 2.5e-3, 16),
        # configs/SSv2/MVITv2_B_32x3.yaml:4 BATCH_SIZE 16, :71 BASE_LR 0.0015
        ("ssv2_base", 1.5e-3, 16),
    ],
)
def test_video_recipes_lr_per_video_is_slowfast_s(name, base_lr, batch):
    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    for world in (1, 8, 32):
        assert math.isclose(cfg.lr(world) / cfg.global_batch(world), base_lr / batch)


@pytest.mark.parametrize("name", ["ssv2_small", "ssv2_base"])
def test_ssv2_recipes_use_slowfast_s_nesterov_sgd(name):
    """SlowFast configs/SSv2/MVITv2_S_16x4.yaml:75-77 (MVITv2_B_32x3.yaml:78-80) SGD momentum
    0.9 with slowfast/config/defaults.py:842 ``SOLVER.NESTEROV = True`` (not overridden),
    passed to ``torch.optim.SGD`` in slowfast/models/optimizer.py."""
    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    opt = build_optimizer(torch.nn.Linear(4, 3), cfg, world_size=1)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_adamw_recipes_are_not_nesterov_sgd():
    """``nesterov`` only concerns SGD: the AdamW recipes build AdamW whatever it says."""
    cfg = TrainConfig.load(RECIPES_DIR / "k400_small.yaml", ["nesterov=true"])
    assert isinstance(build_optimizer(torch.nn.Linear(4, 3), cfg, 1), torch.optim.AdamW)


def test_nesterov_without_momentum_is_one_config_error():
    """torch's SGD raises at the first step for Nesterov without momentum: the config says so."""
    with pytest.raises(
        UserValueError, match="^invalid training config: nesterov needs momentum > 0$"
    ):
        TrainConfig.from_dict({"optimizer": "sgd", "nesterov": True, "momentum": 0.0})


def test_nesterov_sgd_steps_as_torch_s_reference():
    """The recipe's SGD step is torch's (non-fused) Nesterov SGD step on the same gradients."""
    cfg = TrainConfig.load(RECIPES_DIR / "ssv2_small.yaml")
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, cfg, world_size=1)
    lr = cfg.lr(1)
    want = torch.optim.SGD(
        [{"params": [ref.weight], "weight_decay": 1e-4}, {"params": [ref.bias], "weight_decay": 0}],
        lr=lr, momentum=0.9, nesterov=True, foreach=False,
    )  # fmt: skip
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, o in ((ours, opt), (ref, want)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert torch.allclose(ours.weight, ref.weight, atol=1e-6)
    assert torch.allclose(ours.bias, ref.bias, atol=1e-6)


def test_coco_cascade_l_lsj_recipe_is_detectron2_s_50_epoch_schedule():
    """detectron2 projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep.py:19-31:
    50 epochs (184375 // 2 iterations of 64 images), lr 1e-4, 10x steps at iterations
    163889 // 2 and 177546 // 2, 250-iteration warmup from 0.001 x lr."""
    cfg = TrainConfig.load(RECIPES_DIR / "coco_cascade_mvitv2_l_lsj.yaml")
    iters = 184375 // 2
    assert cfg.epochs == 50
    assert math.isclose(cfg.lr(world_size=64 // cfg.batch_size), 1e-4)
    assert cfg.lr_schedule == "step" and cfg.lr_gamma == 0.1
    steps = [m / iters * cfg.epochs for m in (163889 // 2, 177546 // 2)]
    assert [round(s, 2) for s in cfg.lr_steps] == [round(s, 2) for s in steps]
    assert math.isclose(cfg.warmup_epochs, 250 / iters * cfg.epochs, rel_tol=0.01)
    assert math.isclose(cfg.warmup_lr, 0.001 * 1e-4)


def _official_zero_wd(name: str, p: torch.nn.Parameter) -> bool:
    """facebookresearch/mvit mvit/models/optimizer.py:84-88 (SlowFast
    slowfast/models/optimizer.py, get_param_groups, alike) with ``ZERO_WD_1D_PARAM: True`` and
    ``ZERO_DECAY_POS_CLS: False`` (mvit/config/defaults.py:207, :317; SlowFast
    configs/Kinetics/MVITv2_S_16x4.yaml:21, :63): no decay on 1-D params and biases only."""
    return p.ndim == 1 or name.endswith(".bias")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("in1k_tiny", {}),
        ("in1k_large", {}),
        ("k400_small", {"num_frames": 4}),
        ("ssv2_base", {"num_frames": 4}),
    ],
)
def test_image_and_video_recipes_decay_what_the_official_configs_decay(name, overrides):
    import mvitv2

    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    tiny = {"depths": (1, 1, 1, 1), "embed_dim": 8, "img_size": 32, **overrides}
    model = mvitv2.create_model(cfg.model, num_classes=5, **{**cfg.model_args, **tiny})
    names = dict(model.named_parameters())
    assert any("rel_pos" in n for n in names)  # the case has the tables in question
    opt = build_optimizer(model, cfg, world_size=1)
    by_id = {id(p): n for n, p in names.items()}
    got = {by_id[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    want = {n: 0.0 if _official_zero_wd(n, p) else cfg.weight_decay for n, p in names.items()}
    assert got == want


def test_wd_exempt_spares_each_kind_alone():
    """``norm``: parameters of normalisation layers; ``bias``: other 1-D parameters; ``pos``:
    the model's ``no_weight_decay()`` names. Written out for a small model with all three."""
    from mvitv2.engine.optim import param_groups

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.table = torch.nn.Parameter(torch.zeros(3, 4))
            self.token = torch.nn.Parameter(torch.zeros(1, 1, 4))

        def no_weight_decay(self) -> set[str]:
            return {"table", "token"}

    norm = {"ln.weight", "ln.bias", "bn.weight", "bn.bias"}
    want = {
        (): set(),
        ("norm",): norm,
        ("bias",): {"fc.bias"},
        ("pos",): {"table", "token"},
        ("norm", "bias", "pos"): norm | {"fc.bias", "table", "token"},
    }
    for exempt, spared in want.items():
        groups = {g["name"]: set(g["param_names"]) for g in param_groups(Net(), 0.1, exempt)}
        assert groups["no_decay"] == spared, exempt
        assert groups["decay"] == set(dict(Net().named_parameters())) - spared


def test_unknown_wd_exempt_kind_is_one_config_error():
    with pytest.raises(
        UserValueError,
        match="^invalid training config: wd_exempt takes norm, bias, pos, got \\['norms'\\]$",
    ):
        TrainConfig.from_dict({"wd_exempt": ["norms"]})


def _detectron2_zero_wd(module: torch.nn.Module, local_name: str) -> bool:
    """detectron2 detectron2/solver/build.py get_default_optimizer_params with
    ``weight_decay_norm=0.0`` (configs/common/optim.py:18-27) and the overrides of
    projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py:50-54 (``pos_embed``, ``rel_pos_h``,
    ``rel_pos_w``: 0), matched on the parameter's own name; ``weight_decay_bias`` unset, so
    biases keep the decay."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
    return isinstance(module, norm_types) or local_name in ("pos_embed", "rel_pos_h", "rel_pos_w")


@pytest.mark.parametrize("name", ["coco_maskrcnn_mvitv2_t", "coco_cascade_mvitv2_l_lsj"])
def test_coco_recipes_decay_what_detectron2_decays(name):
    from mvitv2.detection import create_detector

    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    tiny = {"depths": (1, 1, 1, 1), "embed_dim": 8, "num_heads": 1, "img_size": 64}
    model = create_detector(cfg.model, num_classes=3, **{**cfg.model_args, **tiny})
    want = {
        f"{m_name}.{p_name}": 0.0 if _detectron2_zero_wd(m, p_name) else cfg.weight_decay
        for m_name, m in model.named_modules()
        for p_name, _ in m.named_parameters(recurse=False)
    }
    assert any(n.endswith("rel_pos_h") for n in want) and any(n.endswith(".bias") for n in want)
    opt = build_optimizer(model, cfg, world_size=1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    got = {by_id[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert got == want


def test_lsj_pads_a_shrunk_image_with_detectron2_s_grey():
    """detectron2 detectron2/data/transforms/augmentation_impl.py:319 ``FixedSizeCrop(...,
    pad_value=128.0)``, the LSJ crop of projects/MViTv2/configs/common/coco_loader_lsj.py:14:
    a scaled-down image is padded to the crop size with 128, masks with 0."""
    from torchvision import tv_tensors

    from mvitv2.data.detection import detection_train_transforms

    tf = detection_train_transforms(mode="lsj", lsj_size=64, lsj_scale=(0.25, 0.25), hflip_prob=0)
    image = tv_tensors.Image(torch.full((3, 64, 64), 200, dtype=torch.uint8))
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[:, 8:40, 8:40] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes([[8, 8, 40, 40]], format="XYXY", canvas_size=(64, 64)),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(mask),
    }
    out, t = tf(image, target)
    assert out.shape == (3, 64, 64)
    pixels = (out[0] * 255).round().int().flatten().tolist()
    assert pixels.count(128) == 64 * 64 - 16 * 16  # the padding
    assert pixels.count(200) == 16 * 16  # the image, a quarter of its side
    assert int(t["masks"].sum()) == 8 * 8  # the mask shrunk with it, padded with 0


def test_coco_multiscale_recipes_apply_detectron2_s_random_crop_half_the_time():
    """detectron2 projects/MViTv2/configs/common/coco_loader.py:20-30: with probability 0.5,
    ResizeShortestEdge([400, 500, 600], "choice") then RandomCrop("absolute_range", (384, 600)),
    before the 480-800 multi-scale resize."""
    from mvitv2.data.detection import RandomRangeCrop, detection_train_transforms
    from mvitv2.tasks.detect import DetectionDataConfig

    for name in ("coco_maskrcnn_mvitv2_t", "coco_cascade_mvitv2_b"):
        dc = DetectionDataConfig.from_dict(TrainConfig.load(RECIPES_DIR / f"{name}.yaml").data)
        assert dc.aug == "multiscale" and dc.crop_prob == 0.5
        tf = detection_train_transforms(mode=dc.aug, crop_prob=dc.crop_prob)
        apply = next(t for t in tf.transforms if isinstance(t, v2.RandomApply))
        resize, crop = apply.transforms
        assert apply.p == 0.5 and resize.min_size == [400, 500, 600] and resize.max_size is None
        assert isinstance(crop, RandomRangeCrop) and (crop.lo, crop.hi) == (384, 600)


def test_range_crop_is_detectron2_s_absolute_range_crop():
    """detectron2 detectron2/data/transforms/augmentation_impl.py RandomCrop.get_crop_size,
    ``absolute_range``: each side uniform in [min(side, lo), min(side, hi)], position uniform;
    boxes follow, clipped to the crop. Checked against slicing by hand."""
    from torchvision import tv_tensors

    from mvitv2.data.detection import RandomRangeCrop

    noise = torch.randint(0, 256, (3, 500, 700), generator=torch.Generator().manual_seed(0))
    image = tv_tensors.Image(noise.to(torch.uint8))  # no two 384 px crops alike
    box = [[100.0, 50.0, 650.0, 450.0]]
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(500, 700))
        out, b = RandomRangeCrop(384, 600)(image, boxes)
        h, w = out.shape[-2:]
        assert 384 <= h <= 500 and 384 <= w <= 600
        flat = image[0]
        # the offset: where the crop's pixels are in the image
        matches = (flat[: 500 - h + 1, : 700 - w + 1] == out[0, 0, 0]).nonzero().tolist()
        top, left = next(
            (t, x) for t, x in matches if torch.equal(image[:, t : t + h, x : x + w], out)
        )
        x1, y1, x2, y2 = box[0]
        want = [
            min(max(x1 - left, 0), w),
            min(max(y1 - top, 0), h),
            min(max(x2 - left, 0), w),
            min(max(y2 - top, 0), h),
        ]
        assert b.tolist() == [want]
        sizes.add((h, w))
    assert len(sizes) > 15  # sizes are drawn, not fixed
    small = tv_tensors.Image(torch.zeros(3, 300, 200))
    assert RandomRangeCrop(384, 600)(small).shape[-2:] == (300, 200)  # smaller: kept whole


def test_in1k_randaugment_fills_uncovered_pixels_with_the_mean_colour():
    """facebookresearch/mvit mvit/datasets/transform.py:194-197 passes
    ``img_mean=round(255 * mean)`` to RandAugment, which fills what rotations, shears and
    translations uncover with it (mvit/datasets/rand_augment.py:342 ``fillcolor``): ImageNet's
    (124, 116, 104), not black. Only Rotate is left to draw, at the recipe's magnitude."""
    from PIL import Image

    cfg = TrainConfig.load(RECIPES_DIR / "in1k_base.yaml")
    tf = build_transform(ImageDataConfig.from_dict(cfg.data), train=True)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    ra._AUGMENTATION_SPACE = {"Rotate": v2.RandAugment._AUGMENTATION_SPACE["Rotate"]}
    torch.manual_seed(0)
    out = ra(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert out.getpixel((0, 0)) == (124, 116, 104)
    assert out.getpixel((32, 32)) == (255, 255, 255)


@pytest.mark.parametrize("name", ["k400_small", "ssv2_base"])
def test_video_randaugment_has_slowfast_s_noise_and_grey_fill(name):
    """SlowFast configs/Kinetics/MVITv2_S_16x4.yaml:49 ``rand-m7-n4-mstd0.5-inc1`` (noise of
    std 0.5 on timm's 0..10 scale: 1.5 bins of torchvision's 0..30), and
    slowfast/datasets/rand_augment.py:39 ``_FILL = (128, 128, 128)``, the colour rotations,
    shears and shifts uncover (no ``img_mean`` is passed for video, slowfast/datasets/
    transform.py create_random_augment). Only Rotate is left to draw."""
    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    aug = VideoDataConfig.from_dict(cfg.data).transform(train=True)._augment
    ra = next(t for t in aug.transforms if isinstance(t, v2.RandAugment))
    _, want_std = _timm_rotate("rand-m7-n4-mstd0.5-inc1")
    assert isinstance(ra, RandAugment)
    assert math.isclose(_rotate(ra.num_magnitude_bins, ra.magnitude_std), want_std)
    ra._AUGMENTATION_SPACE = {"Rotate": v2.RandAugment._AUGMENTATION_SPACE["Rotate"]}
    torch.manual_seed(0)
    from torchvision import tv_tensors

    out = ra(tv_tensors.Video(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)))
    assert out[:, :, 0, 0].tolist() == [[128] * 3] * 2  # both frames, every channel
    assert out[:, :, 16, 16].tolist() == [[255] * 3] * 2


def test_video_randaugment_options_out_of_range_are_one_config_error():
    for key, value, msg in (
        ("randaug_m", 31, "randaug_m must be in 0..30, got 31"),
        ("randaug_mstd", -1.0, "randaug_mstd must be >= 0, got -1.0"),
        ("randaug_n", -1, "randaug_n must be >= 0 (0: off), got -1"),
    ):
        with pytest.raises(UserValueError, match=f"^invalid video data config: {re.escape(msg)}$"):
            VideoDataConfig.from_dict({key: value})


@pytest.mark.parametrize("name", ["in1k_base", "k400_small"])
def test_randaugment_applies_each_op_with_timm_s_probability_one_half(name):
    """timm's RandAugment, which the official AA_TYPE strings build (facebookresearch/mvit
    mvit/datasets/rand_augment.py:445 ``AugmentOp(name, prob=0.5, ...)``, SlowFast's copy
    alike), applies each of the n drawn ops with probability 0.5: of 400 single Rotate ops about
    half change a white image (binomial: 200 +- 10, bounds at 5 standard deviations)."""
    from PIL import Image

    cfg = TrainConfig.load(RECIPES_DIR / f"{name}.yaml")
    if name.startswith("in1k"):
        tf = build_transform(ImageDataConfig.from_dict(cfg.data), train=True).transforms
    else:
        tf = VideoDataConfig.from_dict(cfg.data).transform(train=True)._augment.transforms
    ra = next(t for t in tf if isinstance(t, RandAugment))
    assert ra.prob == 0.5
    ra.ops, ra.mean_magnitude, ra.magnitude_std = 1, 30, 0.0
    ra._AUGMENTATION_SPACE = {"Rotate": v2.RandAugment._AUGMENTATION_SPACE["Rotate"]}
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    torch.manual_seed(0)
    changed = sum(ra(white).getpixel((0, 0)) != (255, 255, 255) for _ in range(400))
    assert 150 <= changed <= 250


def test_a_run_saved_before_the_new_optimizer_keys_is_the_same_experiment(tmp_path):
    """``--resume auto`` after an upgrade: a checkpoint whose config predates ``nesterov`` and
    ``wd_exempt`` computed as their defaults do, so it is still this run's; a run that sets
    them otherwise is another experiment."""
    from mvitv2.engine.checkpoint import find_resume

    config = TrainConfig().to_dict()
    old = {k: v for k, v in config.items() if k not in ("nesterov", "wd_exempt")}
    (tmp_path / "r").mkdir()
    torch.save({"config": old, "meta": {}}, tmp_path / "r" / "last.pt")
    assert find_resume("auto", tmp_path, "r", config, {}).differences == []
    other = TrainConfig.from_dict({"wd_exempt": ["norm", "bias"]}).to_dict()
    found = find_resume(str(tmp_path / "r"), tmp_path, "r", other, {})
    assert found.differences == ["wd_exempt"]
