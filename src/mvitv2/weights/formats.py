"""Checkpoint key formats: detect which codebase wrote a state dict and rename it to ours.

Every format is one :class:`KeyFormat` (a detector plus a converter to our names) in the ordered
list :data:`FORMATS`; the first detector that matches wins. Our own layout is the official one
(facebookresearch/mvit, SlowFast) with flat ``blocks.{i}``; its later revisions are handled by
the versioned migrations in :data:`MIGRATIONS` (applied to checkpoints that record an older
``format_version``), so renaming a module never orphans published weights.

Conversion is purely about names and trivially re-shaped tensors (torchvision's 1-D class token);
fitting tensors to a particular model (kernel squeeze/inflation, table interpolation, head reset)
happens in :mod:`mvitv2.weights.load`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import yaml
from torch import Tensor

#: Version of our own state-dict layout written by :func:`to_official` / training checkpoints.
FORMAT_VERSION = 1

StateDict = dict[str, Tensor]

# Containers that hold the weights, in the order they are tried (SlowFast/official, detectron2 and
# our engine, Lightning/timm training checkpoints, DDP wrappers).
_CONTAINER_KEYS = ("model_state", "model", "state_dict", "module")
# Wrapper prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class KeyFormat:
    """One checkpoint layout.

    Args:
        name: short name reported by the loader (``official``, ``timm``, ...).
        description: where such checkpoints come from.
        detect: True when a (unwrapped) state dict is in this layout.
        convert: renames the state dict to our names; returns (state dict, notes).
    """

    name: str
    description: str
    detect: Callable[[Mapping[str, Tensor]], bool]
    convert: Callable[[StateDict], tuple[StateDict, list[str]]]


# --------------------------------------------------------------------------- helpers
def _rename(sd: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Apply regex substitutions (first match per key wins)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            new, n = re.subn(pat, rep, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def _separate_qkv_prefixes(sd: Mapping[str, Tensor]) -> list[str]:
    """Attention modules (``blocks.{i}.attn.``) that store separate ``q``/``k``/``v`` linears."""
    return sorted({k[: -len("q.weight")] for k in sd if k.endswith("attn.q.weight")})


def recorded_pool_first(checkpoint: object) -> bool | None:
    """``MVIT.POOL_FIRST`` as recorded in a SlowFast / facebookresearch/mvit checkpoint.

    Their ``save_checkpoint`` stores the training config as ``checkpoint["cfg"] = cfg.dump()``
    (a YAML string); a mapping is accepted too. Returns None when the checkpoint records no
    ``MVIT`` config (a bare state dict, or a file saved by other code).
    """
    cfg = checkpoint.get("cfg") if isinstance(checkpoint, Mapping) else None
    if isinstance(cfg, str):
        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return None
    mvit = cfg.get("MVIT") if isinstance(cfg, Mapping) else None
    if not isinstance(mvit, Mapping):
        return None
    return bool(mvit.get("POOL_FIRST", False))  # SlowFast's and mvit's default is False


def _require_project_first(sd: Mapping[str, Tensor], checkpoint: object) -> None:
    """Refuse separate q/k/v linears unless the checkpoint says they project before pooling.

    SlowFast/mvit build separate ``attn.q/k/v`` for ``MVIT.SEPARATE_QKV`` (project, then pool,
    like our merged ``attn.qkv``: an exact merge) and for ``MVIT.POOL_FIRST`` (pool the input,
    then project: other numbers with the same key names and, mostly, the same shapes).
    """
    if not _separate_qkv_prefixes(sd):
        return
    pool_first = recorded_pool_first(checkpoint)
    if pool_first:
        raise ValueError(
            "the checkpoint was trained with MVIT.POOL_FIRST=True (Q/K/V pooled before their "
            "attn.q/k/v projections); mvitv2 projects before pooling, so these weights cannot be "
            "loaded exactly and are refused. Use weights trained with MVIT.POOL_FIRST=False."
        )
    if pool_first is None:
        raise ValueError(
            "the checkpoint stores separate attn.q/k/v projections but no training config "
            "('cfg' with MVIT.POOL_FIRST) saying whether Q/K/V were projected before pooling "
            "(MVIT.POOL_FIRST=False: loads exactly) or after it (MVIT.POOL_FIRST=True: cannot "
            "be loaded). If it was trained with MVIT.POOL_FIRST=False, pass {'model_state': "
            "state_dict, 'cfg': 'MVIT: {POOL_FIRST: false}'} as the source."
        )


def _merge_separate_qkv(sd: StateDict, notes: list[str]) -> StateDict:
    """SlowFast ``SEPARATE_QKV`` checkpoints store ``attn.q/k/v``; our model has one ``attn.qkv``
    (rows q, k, v). Only called once :func:`_require_project_first` has accepted the checkpoint."""
    prefixes = _separate_qkv_prefixes(sd)
    if not prefixes:
        return sd
    sd = dict(sd)
    for p in prefixes:
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{p}{n}.{kind}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                sd[f"{p}qkv.{kind}"] = torch.cat(parts, dim=0)
    notes.append(
        f"merged separate attn.q/k/v into attn.qkv in {len(prefixes)} blocks "
        "(recorded MVIT.POOL_FIRST=False: exact)"
    )
    return sd


# --------------------------------------------------------------------------- formats
def _is_official(sd: Mapping[str, Tensor]) -> bool:
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.") for k in sd)


def _from_official(sd: StateDict) -> tuple[StateDict, list[str]]:
    notes: list[str] = []
    return _merge_separate_qkv(sd, notes), notes


def _is_timm(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("stages.0.blocks.0.") for k in sd)


def _from_timm(sd: StateDict) -> tuple[StateDict, list[str]]:
    # timm nests blocks per stage; ours are flat, so block j of stage s is sum(depths[:s]) + j.
    depths: dict[int, int] = {}
    for k in sd:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, j = int(m[1]), int(m[2])
            depths[s] = max(depths.get(s, 0), j + 1)
    if sorted(depths) != list(range(len(depths))):
        raise ValueError(f"timm checkpoint has non-contiguous stages {sorted(depths)}")
    offsets = [sum(depths[i] for i in range(s)) for s in range(len(depths))]

    def flat(m: re.Match) -> str:
        return f"blocks.{offsets[int(m[1])] + int(m[2])}."

    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", flat, k)
        k = re.sub(r"\.shortcut_proj_(attn|mlp)\.", ".proj.", k)
        k = re.sub(r"^head\.fc\.", "head.projection.", k)
        out[k] = v
    return out, [f"timm stage depths {tuple(depths[s] for s in sorted(depths))}"]


def _is_torchvision(sd: Mapping[str, Tensor]) -> bool:
    return "conv_proj.weight" in sd and "pos_encoding.class_token" in sd


def _from_torchvision(sd: StateDict) -> tuple[StateDict, list[str]]:
    out = _rename(
        sd,
        [
            (r"^conv_proj\.", "patch_embed.proj."),
            (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
            (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
            (r"\.attn\.project\.0\.", ".attn.proj."),
            (r"\.mlp\.0\.", ".mlp.fc1."),
            (r"\.mlp\.3\.", ".mlp.fc2."),
            (r"^(blocks\.\d+)\.project\.", r"\1.proj."),
            (r"^head\.1\.", "head.projection."),
        ],
    )
    # torchvision keeps its tokens and position tables without the batch axis.
    pos = {
        "pos_encoding.class_token": "cls_token",
        "pos_encoding.class_pos": "pos_embed_class",
        "pos_encoding.spatial_pos": "pos_embed_spatial",
        "pos_encoding.temporal_pos": "pos_embed_temporal",
    }
    for src, dst in pos.items():
        if src in out:
            t = out.pop(src)
            out[dst] = t.reshape(1, 1, -1) if t.dim() == 1 else t.unsqueeze(0)
    return out, []


_D2_PREFIX = "backbone.bottom_up."


def _is_detectron2(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(_D2_PREFIX) for k in sd)


def _from_detectron2(sd: StateDict) -> tuple[StateDict, list[str]]:
    out = {}
    other = 0
    for k, v in sd.items():
        if not k.startswith(_D2_PREFIX):
            other += 1  # FPN, RPN, ROI heads, pixel mean/std: not part of the backbone
            continue
        k = k[len(_D2_PREFIX) :]
        m = re.match(r"scale(\d)_norm\.(.*)", k)
        if m:
            k = f"feature_norms.{int(m[1]) - 2}.{m[2]}"
        out[k] = v
    notes = [f"detectron2: kept the backbone, ignored {other} detector (FPN/RPN/ROI) keys"]
    return out, notes


# --------------------------------------------------------------------------- detectron2 detector
# A whole detectron2 GeneralizedRCNN (projects/MViTv2: FPN, RPN, Fast R-CNN or Cascade box heads,
# mask head) renamed to mvitv2's MViTDetector, whose parts are torchvision's
# FeaturePyramidNetwork, RPNHead, FastRCNNConvFCHead, MaskRCNNHeads / MaskRCNNPredictor, and a
# FastRCNNPredictor or (cascade) one AgnosticBoxPredictor per stage.

#: detectron2 keys that are never loaded, and why.
D2_NOT_LOADED = {
    "proposal_generator.anchor_generator.cell_anchors.": "anchors are computed from the config",
    "pixel_mean": "the input normalisation comes from the detector config",
    "pixel_std": "the input normalisation comes from the detector config",
}


def _d2_conv(rest: str) -> str:
    """detectron2 ``Conv2d`` (weight/bias, its norm under ``norm.``) -> torchvision
    ``Conv2dNormActivation`` (conv at ``0.``, norm at ``1.``)."""
    return "1." + rest[len("norm.") :] if rest.startswith("norm.") else "0." + rest


def _d2_box_head(rest: str, num_convs: int) -> str | None:
    """A ``FastRCNNConvFCHead`` key (``conv{i}.``, ``fc{j}.``) in torchvision's layout: convs at
    ``0..n-1``, Flatten at ``n``, fc ``j`` at ``n + 1 + 2 (j - 1)`` (each followed by its ReLU)."""
    if m := re.fullmatch(r"conv(\d+)\.(.*)", rest):
        return f"{int(m[1]) - 1}.{_d2_conv(m[2])}"
    if m := re.fullmatch(r"fc(\d+)\.(.*)", rest):
        return f"{num_convs + 1 + 2 * (int(m[1]) - 1)}.{m[2]}"
    return None


_D2_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (
        r"backbone\.bottom_up\.scale(\d)_norm\.(.*)",
        lambda m: f"backbone.body.feature_norms.{int(m[1]) - 2}.{m[2]}",
    ),
    (r"backbone\.bottom_up\.(.*)", lambda m: f"backbone.body.{m[1]}"),
    (
        r"backbone\.fpn_lateral(\d)\.(.*)",
        lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.{_d2_conv(m[2])}",
    ),
    (
        r"backbone\.fpn_output(\d)\.(.*)",
        lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.{_d2_conv(m[2])}",
    ),
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (
        r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.(.*)",
        lambda m: f"rpn.head.conv.{m[1]}.0.{m[2]}",
    ),
    (
        r"proposal_generator\.rpn_head\.objectness_logits\.(.*)",
        lambda m: f"rpn.head.cls_logits.{m[1]}",
    ),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(.*)", lambda m: f"rpn.head.bbox_pred.{m[1]}"),
    (r"roi_heads\.box_predictor\.(\d+)\.(.*)", lambda m: f"roi_heads.box_predictors.{m[1]}.{m[2]}"),
    (r"roi_heads\.box_predictor\.(.*)", lambda m: f"roi_heads.box_predictor.{m[1]}"),
    (
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.(.*)",
        lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.{_d2_conv(m[2])}",
    ),
    (
        r"roi_heads\.mask_head\.deconv\.(.*)",
        lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}",
    ),
    (
        r"roi_heads\.mask_head\.predictor\.(.*)",
        lambda m: f"roi_heads.mask_predictor.mask_fcn_logits.{m[1]}",
    ),
]


def _d2_name(key: str, box_convs: Mapping[str, int]) -> str | None:
    """Our name for detectron2 ``key`` (None when no rule knows it)."""
    if m := re.fullmatch(r"roi_heads\.box_head\.(?:(\d+)\.)?(.*)", key):
        head = "roi_heads.box_head." if m[1] is None else f"roi_heads.box_heads.{m[1]}."
        rest = _d2_box_head(m[2], box_convs[key[: len(key) - len(m[2])]])
        return None if rest is None else head + rest
    for pattern, rename in _D2_RULES:
        if m := re.fullmatch(pattern, key):
            return rename(m)
    return None


def convert_detectron2_detector(
    sd: Mapping[str, Tensor],
) -> tuple[StateDict, dict[str, str], dict[str, str], list[str]]:
    """Rename a whole detectron2 MViTv2 detector to :class:`mvitv2.detection.MViTDetector`.

    Besides names, two layouts differ: detectron2 puts the background class last in
    ``cls_score`` and has no background outputs in a class-specific ``bbox_pred`` or in the mask
    predictor; torchvision puts the background first and predicts boxes and masks for it too
    (never used: background RoIs are not decoded, and masks are taken at the predicted class).
    So ``cls_score`` rows are rotated (background to index 0), and ``bbox_pred`` /
    ``mask_fcn_logits`` get zero background rows in front. detectron2 class ``c`` becomes label
    ``c + 1``.

    Args:
        sd: the detectron2 state dict (``checkpoint["model"]``, unwrapped).

    Returns:
        ``(state dict, adapted, not_loaded, unknown)``: our state dict; our key -> how its
        tensor was changed; detectron2 key -> why it is not loaded (anchors, pixel statistics);
        detectron2 keys no rule knows (reported as unexpected by the loader).
    """
    box_convs: dict[str, int] = {}
    for k in sd:
        if m := re.fullmatch(r"(roi_heads\.box_head\.(?:\d+\.)?)conv(\d+)\..*", k):
            box_convs[m[1]] = max(box_convs.get(m[1], 0), int(m[2]))
    for k in sd:
        if m := re.fullmatch(r"(roi_heads\.box_head\.(?:\d+\.)?)fc\d+\..*", k):
            box_convs.setdefault(m[1], 0)
    out: StateDict = {}
    adapted: dict[str, str] = {}
    not_loaded: dict[str, str] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        reason = next((why for p, why in D2_NOT_LOADED.items() if k.startswith(p)), None)
        if reason is not None:
            not_loaded[k] = reason
            continue
        name = _d2_name(k, box_convs)
        if name is None:
            unknown.append(k)
            continue
        out[name] = v
    for name in list(out):
        v = out[name]
        if re.fullmatch(r"roi_heads\.box_predictors?(\.\d+)?\.cls_score\.(weight|bias)", name):
            out[name] = torch.cat([v[-1:], v[:-1]])
            adapted[name] = "background moved from the last class row to row 0"
    # Single-stage class-specific boxes (the cascade stages are class-agnostic: 4 rows).
    box, cls = out.get("roi_heads.box_predictor.bbox_pred.weight"), out.get(_CLS_BIAS)
    if box is not None and cls is not None and box.shape[0] == 4 * (len(cls) - 1):
        _pad_background(out, adapted, "roi_heads.box_predictor.bbox_pred", 4, "box deltas")
    mask = out.get("roi_heads.mask_predictor.mask_fcn_logits.weight")
    if mask is not None and mask.shape[0] > 1:  # class-specific masks
        _pad_background(out, adapted, "roi_heads.mask_predictor.mask_fcn_logits", 1, "mask logits")
    return out, adapted, not_loaded, unknown


_CLS_BIAS = "roi_heads.box_predictor.cls_score.bias"


def _pad_background(
    sd: StateDict, adapted: dict[str, str], prefix: str, rows: int, what: str
) -> None:
    for kind in ("weight", "bias"):
        key = f"{prefix}.{kind}"
        if key in sd:
            v = sd[key]
            sd[key] = torch.cat([v.new_zeros((rows, *v.shape[1:])), v])
            adapted[key] = f"{what}: zero background row(s) added in front (never used)"


#: Known layouts, tried in order.
FORMATS: list[KeyFormat] = [
    KeyFormat(
        "detectron2",
        "detectron2 projects/MViTv2 (.pkl / .pth, backbone under backbone.bottom_up.)",
        _is_detectron2,
        _from_detectron2,
    ),
    KeyFormat("timm", "timm mvitv2_* (stages.{s}.blocks.{j}, head.fc)", _is_timm, _from_timm),
    KeyFormat(
        "torchvision",
        "torchvision.models.video mvit_v1_b / mvit_v2_s",
        _is_torchvision,
        _from_torchvision,
    ),
    KeyFormat(
        "official",
        "facebookresearch/mvit, SlowFast and mvitv2 (flat blocks.{i}, head.projection)",
        _is_official,
        _from_official,
    ),
]

#: Migrations of our own layout: ``MIGRATIONS[v]`` turns a version-``v`` state dict into
#: version ``v + 1``. Empty while the layout is at version 1; add one function per rename.
MIGRATIONS: dict[int, Callable[[StateDict], StateDict]] = {}


def migrate(sd: StateDict, version: int) -> StateDict:
    """Bring a state dict written at our layout ``version`` up to :data:`FORMAT_VERSION`."""
    if version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format_version {version} is newer than this mvitv2 ({FORMAT_VERSION}); "
            "upgrade mvitv2"
        )
    for v in range(version, FORMAT_VERSION):
        sd = MIGRATIONS[v](sd)
    return sd


# --------------------------------------------------------------------------- entry points
def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(_is_tensor_like(v) for v in obj.values())


def _is_tensor_like(v: object) -> bool:
    return isinstance(v, Tensor) or type(v).__name__ == "ndarray"


def unwrap(obj: object) -> tuple[StateDict, int | None]:
    """Find the state dict inside a checkpoint container.

    Args:
        obj: a state dict, or a dict holding one under ``model_state`` (official/SlowFast),
            ``model`` (detectron2, our engine), ``state_dict`` or ``module``.

    Returns:
        ``(state_dict, format_version)``: tensors only (numpy arrays converted), wrapper prefixes
        (``module.``, ``_orig_mod.``) removed; ``format_version`` when the container records it.
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    version = obj.get("format_version") if isinstance(obj.get("format_version"), int) else None
    sd = obj
    if not _is_state_dict(obj):
        for key in _CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                sd = obj[key]
                break
        else:
            raise ValueError(
                "no state dict found: expected tensors at the top level or under one of "
                f"{list(_CONTAINER_KEYS)}; top-level keys are {sorted(map(str, obj))[:20]}"
            )
    out: StateDict = {}
    for k, v in sd.items():
        if not _is_tensor_like(v):
            continue  # counters such as num_batches_tracked stored as ints, strings, ...
        t = v if isinstance(v, Tensor) else torch.as_tensor(v)
        # DDP (``module.``) and torch.compile (``_orig_mod.``) wrap each other in either order
        while wrapper := next((p for p in _WRAPPER_PREFIXES if k.startswith(p)), None):
            k = k.removeprefix(wrapper)
        out[k] = t
    return out, version


def detect_format(sd: Mapping[str, Tensor]) -> KeyFormat:
    """The first :data:`FORMATS` entry whose detector accepts ``sd``; ValueError if none."""
    for fmt in FORMATS:
        if fmt.detect(sd):
            return fmt
    sample = sorted(sd)[:8]
    raise ValueError(
        "unrecognised checkpoint layout (known: "
        + ", ".join(f.name for f in FORMATS)
        + f"); first keys: {sample}"
    )


def convert_state_dict(
    checkpoint: Mapping, *, return_info: bool = False
) -> StateDict | tuple[StateDict, str, list[str]]:
    """Detect the layout of a checkpoint and rename it to mvitv2's names.

    Args:
        checkpoint: a state dict or a checkpoint container (see :func:`unwrap`) from any
            supported codebase: official image / SlowFast video, detectron2, timm, torchvision,
            or mvitv2 itself.
        return_info: also return the detected format name and conversion notes.

    Returns:
        The state dict with our key names (tensor shapes unchanged except torchvision's
        batch-less tokens), or ``(state_dict, format_name, notes)`` with ``return_info``.

    Raises:
        ValueError: unknown layout, or separate ``attn.q/k/v`` projections that are not known to
            run before pooling (SlowFast ``MVIT.POOL_FIRST=True``, or no recorded config).
    """
    sd, version = unwrap(checkpoint)
    fmt = detect_format(sd)
    if fmt.name == "official":
        _require_project_first(sd, checkpoint)
    sd, notes = fmt.convert(sd)
    if fmt.name == "official" and version is not None:
        sd = migrate(sd, version)
    return (sd, fmt.name, notes) if return_info else sd


def to_official(state_dict: Mapping[str, Tensor], *, image_kernels_5d: bool = True) -> dict:
    """Export an mvitv2 state dict in the official (facebookresearch/mvit, SlowFast) layout.

    Args:
        state_dict: our state dict (``model.state_dict()``).
        image_kernels_5d: write image conv kernels (patch embed, Q/K/V pooling) as 5-D with
            ``T = 1``, as the official image checkpoints do.

    Returns:
        ``{"model_state": state_dict, "format_version": FORMAT_VERSION}``.
    """
    out = {}
    for k, v in state_dict.items():
        is_conv = k == "patch_embed.proj.weight" or re.search(r"attn\.pool_[qkv]\.weight$", k)
        if image_kernels_5d and is_conv and v.dim() == 4:
            v = v.unsqueeze(2)
        out[k] = v
    return {"model_state": out, "format_version": FORMAT_VERSION}
