"""The released MViTv2 weights: where they are, what they expect, what they scored.

Every entry records the URL, sha256 (None where no published digest is known; torchvision file
names carry a hash prefix that is checked instead), the model variant, the classes, the
preprocessing the weights were evaluated with, and the accuracy reported by the paper or the
releasing repository. Files are downloaded once into torch.hub's cache; offline,
:func:`load_pretrained` says which URL to fetch and where to put the file.

Sources: facebookresearch/mvit README (image), facebookresearch/SlowFast projects/mvitv2
README (Kinetics), torchvision.models.video (ported Kinetics weights), detectron2
projects/MViTv2 README (COCO).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mvitv2.errors import UnknownKeyError, UserValueError
from mvitv2.weights.classes import dataset_classes
from mvitv2.weights.io import CheckpointError, cached_path, download

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How inputs must be prepared for a set of weights.

    Attributes:
        input_size: ``(C, H, W)`` for images, ``(C, T, H, W)`` for video.
        crop_pct: centre crop / resized short side (0.875: resize to 256, crop 224).
        interpolation: resize interpolation.
        mean, std: per-channel normalisation of [0, 1] RGB.
        sampling_rate: video frame stride.
        protocol: evaluation views (e.g. ``"5 clips x 1 crop"``).
        clips: video clips per video the reported metrics average (uniformly spaced).
        crops: spatial crops per clip (1: centre; 3: start, centre, end of the longer side).
        target_fps: the frame rate frames are counted at whatever a file's own (SlowFast's 30);
            None: the file's rate.
        video_protocol: whose video test took the views: ``"slowfast"`` (PySlowFast's clips
            and crops) or ``"torchvision"`` (its reference script: consecutive frames of the
            video resampled to ``target_fps / sampling_rate``, uint8 resize); see
            ``mvitv2.tasks.video.PROTOCOLS``.
    """

    input_size: tuple[int, ...] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sampling_rate: int | None = None
    protocol: str = "1 centre crop"
    clips: int = 1
    crops: int = 1
    target_fps: float | None = None
    video_protocol: str = "slowfast"

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop: the input's shorter side over ``crop_pct`` (800
        for the detectors' 800 x 1333, which are not cropped)."""
        return round(min(self.input_size[-2:]) / self.crop_pct)


@dataclass(frozen=True)
class Weights:
    """One released checkpoint.

    Attributes:
        tag: registry key, ``"<model>.<dataset>[_<variant>]"``.
        model: mvitv2 variant name the weights are for (``create_model(model, **model_kwargs)``).
        url: download URL.
        sha256: full sha256 of the file, or None when no published digest is known.
        num_classes: classifier outputs of the checkpoint (detectors: object classes).
        classes: class-name source (``imagenet-1k``, ``imagenet-21k``, ``kinetics-400``, ``coco``).
        preprocessing: input preparation used for the reported metrics.
        metrics: reported figures (``top1``, ``top5``, ``box_ap``, ``mask_ap``) and their source.
        source_format: checkpoint layout (``official``, ``slowfast``, ``torchvision``,
            ``detectron2``).
        task: ``classification``, ``video`` or ``detection``.
        model_kwargs: extra ``create_model`` options the weights need.
        notes: anything a user must know.
        detector: whole-detector weights: the registered detector they load into
            (``mvitv2.detection.load_detectron2_detector(tag)``); their backbone also loads
            into ``model`` (``create_model(model, pretrained=tag, features_only=True)``).
    """

    tag: str
    model: str
    url: str
    sha256: str | None
    num_classes: int
    classes: str
    preprocessing: Preprocessing
    metrics: dict[str, float | str]
    source_format: str
    task: str = "classification"
    model_kwargs: dict = field(default_factory=dict)
    notes: str = ""
    detector: str = ""

    @property
    def class_names(self) -> list[str] | None:
        """The name of each output in label order (detectors: object classes, background
        excluded), as torchvision's ``weights.meta["categories"]``; None where the label order is
        not published (ImageNet-21k). See :mod:`mvitv2.weights.classes`."""
        return dataset_classes(self.classes)

    @property
    def filename(self) -> str:
        """The file the URL downloads to: its path's last part (a query string is no part of it)."""
        return self.cache_path.name

    @property
    def cache_path(self) -> Path:
        """Where the file is (or will be) in torch.hub's cache."""
        return cached_path(self.url)

    @property
    def reported(self) -> str:
        """The reported figures as text (``top-1 82.3  top-5 95.7``; ``-`` when none)."""
        names = {"top1": "top-1", "top5": "top-5", "box_ap": "box AP", "mask_ap": "mask AP"}
        m = self.metrics
        return "  ".join(f"{label} {m[key]:g}" for key, label in names.items() if key in m) or "-"

    def timm_cfg(self) -> dict[str, Any]:
        """These weights as a timm ``pretrained_cfg`` (its keys and value types)."""
        p = self.preprocessing
        return {
            "url": self.url,
            "architecture": self.model,
            "input_size": tuple(p.input_size),
            "interpolation": p.interpolation,
            "crop_pct": p.crop_pct,
            "crop_mode": "center",
            "mean": tuple(p.mean),
            "std": tuple(p.std),
            "num_classes": self.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head.projection",
        }

    # ``model.pretrained_cfg`` is a Weights: timm's data helpers read it as a dict
    # (``timm.data.resolve_data_config(model=model)``).
    def get(self, key: str, default: Any = None) -> Any:
        """``timm_cfg().get(key, default)``."""
        return self.timm_cfg().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.timm_cfg()[key]

    @property
    def needs_pickle(self) -> bool:
        """detectron2 model-zoo ``.pkl`` files need ``allow_pickle=True``.

        Judged by the suffix in any case, as :func:`~mvitv2.weights.io.read_checkpoint` does, so
        that a pickle is refused before it is downloaded."""
        return self.cache_path.suffix.lower() == ".pkl"


_MVIT = "https://dl.fbaipublicfiles.com/mvit/mvitv2_models/"
_PYSF = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/mvitv2/pysf_video_models/"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/MViTv2/"
_TV = "https://download.pytorch.org/models/"

_IN1K = Preprocessing()
_K400_224 = Preprocessing(
    input_size=(3, 16, 224, 224),
    interpolation="bilinear",
    mean=KINETICS_MEAN,
    std=KINETICS_STD,
    sampling_rate=4,
    protocol="5 clips x 1 centre crop, short side 256",
    clips=5,
    target_fps=30.0,
)
# detectron2's test pipeline for every MViTv2 detector, the LSJ-trained L and H included (their
# configs change only the training augmentation): ResizeShortestEdge(800, max_size=1333) with PIL's
# bilinear filter on uint8 RGB, ImageNet mean/std on [0, 255], zero padding to a multiple of 32.
_COCO = Preprocessing(
    input_size=(3, 800, 1333),
    crop_pct=1.0,
    interpolation="bilinear",
    protocol="shorter side 800, longer side <= 1333 (PIL bilinear on uint8 RGB), padded to 32",
)


def _image(tag: str, model: str, file: str, top1: float | None, **kw) -> Weights:
    in21k = "in21k" in tag
    metrics: dict[str, float | str] = {"source": "facebookresearch/mvit README"}
    if top1 is not None:
        metrics["top1"] = top1
    return Weights(
        tag=tag,
        model=model,
        url=_MVIT + file,
        sha256=None,
        num_classes=19168 if in21k else 1000,
        classes="imagenet-21k" if in21k else "imagenet-1k",
        preprocessing=_IN1K,
        metrics=metrics,
        source_format="official",
        **kw,
    )


def _video(
    tag: str,
    model: str,
    file: str,
    frames: int,
    rate: int,
    top1: float,
    top5: float,
    size: int = 224,
    crops: int = 1,
    imagenet_norm: bool = False,
) -> Weights:
    pre = dataclasses.replace(
        _K400_224,
        input_size=(3, frames, size, size),
        sampling_rate=rate,
        crop_pct=0.875 if crops == 1 else 1.0,
        mean=IMAGENET_MEAN if imagenet_norm else KINETICS_MEAN,
        std=IMAGENET_STD if imagenet_norm else KINETICS_STD,
        protocol=f"5 clips x {crops} crop(s), short side {256 if crops == 1 else size}",
        crops=crops,
    )
    return Weights(
        tag=tag,
        model=model,
        url=_PYSF + file,
        sha256=None,
        num_classes=400,
        classes="kinetics-400",
        preprocessing=pre,
        metrics={"top1": top1, "top5": top5, "source": "SlowFast projects/mvitv2 README"},
        source_format="slowfast",
        task="video",
    )


def _det(
    tag: str,
    model: str,
    detector: str,
    path: str,
    box: float,
    mask: float,
    method: str,
    params_m: int,
    gflops: int,
    **kw,
) -> Weights:
    return Weights(
        tag=tag,
        model=model,
        url=_D2 + path,
        sha256=None,
        num_classes=80,
        classes="coco",
        preprocessing=_COCO,
        metrics={
            "box_ap": box,
            "mask_ap": mask,
            "params_m": params_m,
            "gflops": gflops,
            "source": "detectron2 projects/MViTv2 README",
        },
        source_format="detectron2",
        task="detection",
        detector=detector,
        notes=f"{method} (detectron2). The whole detector: "
        f"mvitv2.detection.load_detectron2_detector({tag!r}, allow_pickle=True); the backbone "
        "alone: create_model(..., features_only=True, pretrained=tag). Needs allow_pickle=True "
        "(.pkl).",
        **kw,
    )


_NO_CLS = {"use_cls_token": False}
_TV_NOTE = (
    "SlowFast's weights as torchvision ported them; evaluated as torchvision's reference script "
    "does (5 clips of 16 consecutive frames of the video resampled to 7.5 fps, uint8 resize to "
    "256, centre crop 224); `mvitv2 eval video --protocol slowfast` takes SlowFast's clips"
)
# torchvision's test: references/video_classification (--clip-len 16 --frame-rate 7.5
# --clips-per-video 5) with the weights' VideoClassification preset.
_K400_TV = dataclasses.replace(
    _K400_224,
    protocol="5 clips x 1 crop, resize 256, crop 224, frame_rate 7.5",
    video_protocol="torchvision",
)

_ALL: list[Weights] = [
    # ImageNet-1k (official, facebookresearch/mvit).
    _image("mvitv2_tiny.in1k", "mvitv2_tiny", "MViTv2_T_in1k.pyth", 82.3),
    _image("mvitv2_small.in1k", "mvitv2_small", "MViTv2_S_in1k.pyth", 83.6),
    _image("mvitv2_base.in1k", "mvitv2_base", "MViTv2_B_in1k.pyth", 84.4),
    _image("mvitv2_large.in1k", "mvitv2_large", "MViTv2_L_in1k.pyth", 85.3),
    # ImageNet-21k (19,168 classes; the README's 87.5 / 88.0 top-1 are after IN-1k fine-tuning,
    # whose weights were not released).
    _image("mvitv2_base_cls.in21k", "mvitv2_base_cls", "MViTv2_B_in21k.pyth", None),
    _image(
        "mvitv2_large_cls.in21k", "mvitv2_large_cls", "MViTv2_L_in21k.pyth", None,
        notes="paper: 87.5 top-1 on IN-1k after fine-tuning (fine-tuned weights not released)",
    ),  # fmt: skip
    _image(
        "mvitv2_huge_cls.in21k", "mvitv2_huge_cls", "MViTv2_H_in21k.pyth", None,
        notes="paper: 88.0 top-1 on IN-1k after fine-tuning (fine-tuned weights not released)",
    ),  # fmt: skip
    # Kinetics-400 (SlowFast).
    _video("mvitv2_small_16x4.k400", "mvitv2_small_16x4", "MViTv2_S_16x4_k400_f302660347.pyth",
           16, 4, 81.0, 94.6),
    _video("mvitv2_base_32x3.k400", "mvitv2_base_32x3", "MViTv2_B_32x3_k400_f304025456.pyth",
           32, 3, 82.9, 95.7),
    # L was trained from IN-21k weights with ImageNet's mean/std (SlowFast
    # configs/Kinetics/MVITv2_L_40x3_test.yaml DATA.MEAN/STD), unlike S and B (SlowFast defaults).
    _video("mvitv2_large_40x3.k400", "mvitv2_large_40x3", "MViTv2_L_40x3_k400_f306903192.pyth",
           40, 3, 86.1, 97.0, size=312, crops=3, imagenet_norm=True),
    # Kinetics-400 ported by torchvision (hash prefix in the file name is verified).
    Weights(
        tag="mvitv2_small_16x4.k400_tv", model="mvitv2_small_16x4",
        url=_TV + "mvit_v2_s-ae3be167.pth", sha256=None, num_classes=400, classes="kinetics-400",
        preprocessing=_K400_TV,
        metrics={"top1": 80.757, "top5": 94.665, "source": "torchvision MViT_V2_S_Weights"},
        source_format="torchvision", task="video", notes=_TV_NOTE,
    ),
    Weights(
        tag="mvitv1_base_16x4.k400_tv", model="mvitv1_base_16x4",
        url=_TV + "mvit_v1_b-dbeb1030.pth", sha256=None, num_classes=400, classes="kinetics-400",
        preprocessing=_K400_TV,
        metrics={"top1": 78.477, "top5": 93.582, "source": "torchvision MViT_V1_B_Weights"},
        source_format="torchvision", task="video", notes=_TV_NOTE,
    ),
    # COCO (detectron2 projects/MViTv2): whole Mask R-CNN / Cascade Mask R-CNN detectors.
    _det("mvitv2_tiny.coco_mask_rcnn", "mvitv2_tiny", "maskrcnn_mvitv2_tiny",
         "mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl", 48.3, 43.8,
         "Mask R-CNN, IN-1k pre-training, 36 epochs", 44, 279),
    _det("mvitv2_tiny.coco_cascade", "mvitv2_tiny", "cascade_maskrcnn_mvitv2_tiny",
         "cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl", 52.2, 45.0,
         "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs", 76, 701),
    _det("mvitv2_small.coco_cascade", "mvitv2_small", "cascade_maskrcnn_mvitv2_small",
         "cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl", 53.2, 46.0,
         "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs", 87, 748),
    _det("mvitv2_base.coco_cascade", "mvitv2_base", "cascade_maskrcnn_mvitv2_base",
         "cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl", 54.1, 46.7,
         "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs", 103, 814),
    _det("mvitv2_base.coco_cascade_in21k", "mvitv2_base", "cascade_maskrcnn_mvitv2_base",
         "cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl", 54.9, 47.4,
         "Cascade Mask R-CNN, IN-21k pre-training, 36 epochs", 103, 814),
    _det("mvitv2_large_cls.coco_cascade_in21k", "mvitv2_large_cls",
         "cascade_maskrcnn_mvitv2_large",
         "cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl", 55.8,
         48.3, "Cascade Mask R-CNN, IN-21k pre-training, LSJ, 50 epochs", 270, 1519,
         model_kwargs=_NO_CLS),
    _det("mvitv2_huge_cls.coco_cascade_in21k", "mvitv2_huge_cls",
         "cascade_maskrcnn_mvitv2_huge",
         "cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl", 56.1, 48.5,
         "Cascade Mask R-CNN, IN-21k pre-training, LSJ, 36 epochs", 718, 3084,
         model_kwargs=_NO_CLS),
]  # fmt: skip

#: All registered weights by tag.
WEIGHTS: dict[str, Weights] = {w.tag: w for w in _ALL}

#: The weights ``pretrained=True`` picks for a variant (its classification weights).
DEFAULT_WEIGHTS: dict[str, str] = {}
for _w in _ALL:
    if _w.task != "detection":
        DEFAULT_WEIGHTS.setdefault(_w.model, _w.tag)


def register_weights(weights: Weights, *, default: bool = False) -> None:
    """Add (or replace) an entry, e.g. for a private mirror or your own fine-tuned weights."""
    WEIGHTS[weights.tag] = weights
    if default or weights.model not in DEFAULT_WEIGHTS:
        DEFAULT_WEIGHTS[weights.model] = weights.tag


def list_weights(model: str | None = None) -> list[str]:
    """Tags of the registered weights, all or those for variant ``model``."""
    return sorted(t for t, w in WEIGHTS.items() if model is None or w.model == model)


def is_weights_tag(name: str) -> bool:
    """Whether ``name`` is a registered tag and not a file here (a file of that name is what
    :func:`~mvitv2.weights.load_checkpoint` reads)."""
    return name in WEIGHTS and not Path(name).exists()


def get_weights(tag: str) -> Weights:
    """The :class:`Weights` registered under ``tag`` (KeyError listing the tags otherwise)."""
    if tag not in WEIGHTS:
        # A user's typo (pretrained=mvitv2_tiny.in1kk): one line from the CLI, still a KeyError.
        raise UnknownKeyError(f"unknown weights {tag!r}; available: {', '.join(list_weights())}")
    return WEIGHTS[tag]


def download_weights(tag_or_weights: str | Weights, *, progress: bool = True) -> Path:
    """Fetch a registered checkpoint into torch.hub's cache (verified) and return its path."""
    w = get_weights(tag_or_weights) if isinstance(tag_or_weights, str) else tag_or_weights
    return download(w.url, w.sha256, progress=progress)


def load_pretrained(
    model: nn.Module,
    name: str,
    pretrained: bool | str,
    *,
    strict: bool = True,
    allow_pickle: bool = False,
    progress: bool = True,
):
    """Load released weights into a freshly built model (used by ``create_model``).

    Args:
        model: the model built for variant ``name``.
        name: the variant name (selects the default weights when ``pretrained`` is True).
        pretrained: True for the variant's default weights, or a weights tag from
            :func:`list_weights` (e.g. an image tag to inflate into a video model).
        strict: see :func:`mvitv2.weights.load_checkpoint` (a head for another number of
            classes is always just re-initialised).
        allow_pickle: needed for detectron2 ``.pkl`` weights (they are pickles; opt in only if
            you trust the source).
        progress: show a download progress bar.

    Returns:
        The :class:`~mvitv2.weights.LoadReport`.
    """
    from mvitv2.weights.load import load_checkpoint

    if pretrained is True:
        if name not in DEFAULT_WEIGHTS:
            have = sorted(DEFAULT_WEIGHTS)
            raise UserValueError(
                f"no released weights for {name!r}; variants with weights: {', '.join(have)}. "
                "Pass a weights tag (pretrained='<tag>') to load another variant's weights."
            )
        tag = DEFAULT_WEIGHTS[name]
    elif isinstance(pretrained, str):
        tag = pretrained
    else:
        raise TypeError(f"pretrained must be True or a weights tag, got {pretrained!r}")
    w = get_weights(tag)
    if w.needs_pickle and not allow_pickle:
        raise CheckpointError(
            f"weights {w.tag} ({w.url}) are a detectron2 pickle, which can run code when loaded. "
            "If you trust the source, load them with mvitv2.weights.load_pretrained(model, "
            f"{name!r}, {w.tag!r}, allow_pickle=True)."
        )
    path = download_weights(w, progress=progress)
    report = load_checkpoint(model, path, strict=strict, allow_pickle=allow_pickle)
    report.notes.insert(0, f"weights {w.tag} ({w.classes}, {w.source_format})")
    model.pretrained_cfg = w  # preprocessing and classes travel with the model
    return report
