"""``load_checkpoint``: read any supported checkpoint, fit it to a model, load it or say why not.

Fitting a converted state dict to a model (all before the model is touched, so a refused load
changes nothing):

* conv kernels: 5-D ``T = 1`` kernels are squeezed for image models; 2-D (image) kernels are
  inflated for video models, by default the paper's way (centre temporal slice, zeros elsewhere;
  for the depthwise pooling convs this is exactly per-frame 2-D pooling) or SlowFast's
  ``repeat`` (copied over time and divided by ``T``);
* rel-pos tables: linearly interpolated along their length to the model's sizes; an image
  checkpoint gives a video model zero temporal tables;
* absolute position embeddings: bicubic (space) / linear (time) interpolation;
* task-specific parts: a head with another class count, or a head/final norm where the model has
  stage norms (``features_only``), is skipped and reported, never an error (pytorchvideo#26);
  so is a class token for a model without one (IN-21k ``_cls`` weights -> detection backbone).

Anything else that does not fit (missing or unexpected keys, other shapes) raises
:class:`CheckpointMismatchError` listing all of it, or with ``strict=False`` is returned in the
:class:`LoadReport` while the rest loads (a load that fits nothing never passes silently,
SlowFast#506).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.errors import CheckpointNotFoundError
from mvitv2.models.mvit import MViT
from mvitv2.ops import resize_rel_pos
from mvitv2.weights.formats import (
    StateDict,
    convert_detectron2_detector,
    convert_state_dict,
    detect_format,
    unwrap,
)
from mvitv2.weights.io import CheckpointError, download, is_url, read_checkpoint
from mvitv2.weights.registry import WEIGHTS, get_weights, is_weights_tag

log = logging.getLogger(__name__)

_INFLATIONS = ("centre", "center", "repeat")
_CONV_KEY = re.compile(r"^(patch_embed\.proj|blocks\.\d+\.attn\.pool_[qkv])\.weight$")


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model; ``.report`` holds the details."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    Attributes:
        source: the file, URL or ``"<state dict>"`` that was read.
        format: detected layout (``official``, ``timm``, ``torchvision``, ``detectron2``).
        loaded: model keys that received checkpoint values.
        missing: model keys the checkpoint lacks (errors unless ``strict=False``).
        unexpected: checkpoint keys the model has no place for (errors unless ``strict=False``).
        shape_conflicts: ``(key, checkpoint shape, model shape)`` that could not be adapted.
        adapted: key -> how its tensor was changed to fit (squeezed, inflated, interpolated).
        initialized: model key -> why it keeps its fresh initialisation (head reset, ...).
        dropped: checkpoint key -> why it was deliberately not loaded.
        notes: anything else worth knowing (conversion steps, head reset summary).
    """

    source: str = ""
    format: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_conflicts: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )
    adapted: dict[str, str] = field(default_factory=dict)
    initialized: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or in conflict."""
        return not (self.missing or self.unexpected or self.shape_conflicts)

    def problems(self, limit: int = 40) -> str:
        """The missing / unexpected / conflicting keys, one section each (``limit`` per list)."""

        def section(title: str, items: list[str]) -> str:
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return (
                f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items[:limit]) + more
            )

        parts = []
        if self.missing:
            parts.append(
                section("missing keys (in the model, not in the checkpoint)", self.missing)
            )
        if self.unexpected:
            parts.append(
                section("unexpected keys (in the checkpoint, not in the model)", self.unexpected)
            )
        if self.shape_conflicts:
            parts.append(
                section(
                    "shape conflicts (key: checkpoint vs model)",
                    [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.shape_conflicts],
                )
            )
        return "\n".join(parts)

    def __str__(self) -> str:
        lines = [
            f"{self.source} [{self.format}]: loaded {len(self.loaded)} tensors, "
            f"adapted {len(self.adapted)}, initialised {len(self.initialized)}, "
            f"dropped {len(self.dropped)}"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.ok:
            lines.append(self.problems())
        return "\n".join(lines)


# --------------------------------------------------------------------------- tensor fitting
def inflate_kernel(w: Tensor, t: int, mode: str = "centre") -> Tensor:
    """2-D conv kernel ``(O, I, kh, kw)`` -> 3-D ``(O, I, t, kh, kw)``.

    ``centre``: the kernel in the middle temporal slice, zeros elsewhere (MViTv2 paper); a static
    clip then gives each frame exactly the 2-D result. ``repeat``: the kernel copied to every
    slice and divided by ``t`` (SlowFast), which keeps the response to a static clip away from
    the zero-padded clip ends.
    """
    if mode in ("centre", "center"):
        out = w.new_zeros(w.shape[0], w.shape[1], t, *w.shape[2:])
        out[:, :, t // 2] = w
        return out
    if mode == "repeat":
        return w.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    raise ValueError(f"inflation must be one of {_INFLATIONS}, got {mode!r}")


def _fit_conv(w: Tensor, shape: torch.Size, mode: str) -> tuple[Tensor, str] | None:
    if w.dim() == 5 and w.shape[2] == 1 and len(shape) == 4 and w.shape[:2] + w.shape[3:] == shape:
        return w.squeeze(2), "squeezed 5-D T=1 kernel"
    w2 = w.squeeze(2) if w.dim() == 5 and w.shape[2] == 1 else w
    if w2.dim() == 4 and len(shape) == 5 and w2.shape == shape[:2] + shape[3:]:
        return inflate_kernel(w2, shape[2], mode), f"inflated 2-D kernel to T={shape[2]} ({mode})"
    return None


def _fit_in_chans(w: Tensor, in_chans: int) -> Tensor:
    """An RGB patch kernel ``(O, 3, ...)`` for ``in_chans`` input channels, as timm's
    ``adapt_input_conv``: one channel sums the three (a grey image repeated as RGB gives the
    same output); more repeat them, scaled by ``3 / in_chans``."""
    w32 = w.float()  # timm sums in float32 too (a bf16 checkpoint)
    if in_chans == 1:
        return w32.sum(1, keepdim=True).to(w.dtype)
    repeats = -(-in_chans // 3)
    out = w32.repeat(1, repeats, *[1] * (w.dim() - 2))[:, :in_chans] * (3 / in_chans)
    return out.to(w.dtype)


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def _fit_pos_embed(
    v: Tensor, shape: torch.Size, grid: tuple[int, int], num_prefix: int
) -> tuple[Tensor, str] | None:
    """Image abs pos ``(1, p + h*w, C)`` -> the model's prefix count and grid (bicubic)."""
    if v.dim() != 3 or v.shape[2] != shape[2]:
        return None
    n = v.shape[1]
    src_p = num_prefix if _square_side(n - num_prefix) else (1 if _square_side(n - 1) else None)
    if src_p is None or src_p < num_prefix:
        return None
    side = _square_side(n - src_p)
    prefix, pe = v[:, src_p - num_prefix : src_p], v[:, src_p:]
    pe = pe.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
    out = torch.cat((prefix, pe.flatten(2).transpose(1, 2)), dim=1)
    what = f"interpolated {side}x{side} -> {grid[0]}x{grid[1]}"
    if src_p > num_prefix:
        what += ", dropped the class-token slot"
    return out, what


def _fit_spatial_pos(
    v: Tensor, shape: torch.Size, grid: tuple[int, int]
) -> tuple[Tensor, str] | None:
    side = _square_side(v.shape[1]) if v.dim() == 3 else None
    if side is None or v.shape[2] != shape[2]:
        return None
    pe = v.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
    return pe.flatten(2).transpose(1, 2), f"interpolated {side}x{side} -> {grid[0]}x{grid[1]}"


def _fit_temporal_pos(v: Tensor, shape: torch.Size) -> tuple[Tensor, str] | None:
    if v.dim() != 3 or v.shape[2] != shape[2]:
        return None
    out = F.interpolate(v.transpose(1, 2), size=shape[1], mode="linear").transpose(1, 2)
    return out, f"interpolated length {v.shape[1]} -> {shape[1]}"


def _fit(
    key: str, v: Tensor, shape: torch.Size, model: MViT, mode: str
) -> tuple[Tensor, str] | None:
    """Adapt checkpoint tensor ``v`` to the model's ``shape`` for ``key``, or None if impossible."""
    rgb_kernel = key == "patch_embed.proj.weight" and v.dim() >= 4 and v.shape[1] == 3
    if rgb_kernel and len(shape) >= 4 and shape[1] != 3:
        v = _fit_in_chans(v, shape[1])
        what = f"RGB kernel adapted to {shape[1]} input channel(s) (timm's adapt_input_conv)"
        if v.shape == shape:
            return v, what
        fitted = _fit_conv(v, shape, mode)
        return None if fitted is None else (fitted[0], f"{what}; {fitted[1]}")
    if _CONV_KEY.match(key):
        return _fit_conv(v, shape, mode)
    if "rel_pos_" in key and v.dim() == 2 and len(shape) == 2 and v.shape[1] == shape[1]:
        return resize_rel_pos(v, shape[0]), f"interpolated table {v.shape[0]} -> {shape[0]}"
    grid = model.pos_grid[1:]
    if key == "pos_embed":
        return _fit_pos_embed(v, shape, grid, model.num_prefix)
    if key == "pos_embed_spatial":
        return _fit_spatial_pos(v, shape, grid)
    if key == "pos_embed_temporal":
        return _fit_temporal_pos(v, shape)
    return None


# --------------------------------------------------------------------------- planning
def _is_image_checkpoint(sd: Mapping[str, Tensor]) -> bool:
    w = sd.get("patch_embed.proj.weight")
    return w is not None and (w.dim() == 4 or (w.dim() == 5 and w.shape[2] == 1))


def _inflate_abs_pos(sd: StateDict, target: Mapping[str, Tensor], report: LoadReport) -> None:
    """Image ``pos_embed`` -> video ``pos_embed_spatial/temporal/class`` (zero time, class slot)."""
    if "pos_embed" not in sd or "pos_embed_spatial" not in target:
        return
    pe = sd.pop("pos_embed")
    has_cls = _square_side(pe.shape[1]) is None and _square_side(pe.shape[1] - 1) is not None
    sd["pos_embed_spatial"] = pe[:, int(has_cls) :]
    if "pos_embed_temporal" in target:
        sd["pos_embed_temporal"] = torch.zeros_like(target["pos_embed_temporal"], dtype=pe.dtype)
    if "pos_embed_class" in target and has_cls:
        sd["pos_embed_class"] = pe[:, :1]
    report.notes.append("image pos_embed split into spatial/class embeddings, temporal set to 0")


def _plan(model: MViT, sd: StateDict, report: LoadReport, inflation: str) -> dict[str, Tensor]:
    """Decide, for every model and checkpoint key, what happens; return the tensors to load."""
    target = model.state_dict()
    features_only = any(k.startswith("feature_norms.") for k in target)
    ckpt_has_stage_norms = any(k.startswith("feature_norms.") for k in sd)
    inflating = model.cfg.temporal and _is_image_checkpoint(sd)
    if inflating:
        report.notes.append(f"image checkpoint inflated into a video model ({inflation})")
        _inflate_abs_pos(sd, target, report)

    final: dict[str, Tensor] = {}
    head_notes: set[str] = set()
    for key, ref in target.items():
        if key not in sd:
            if key.startswith("head."):
                report.initialized[key] = "checkpoint has no classifier"
                head_notes.add("checkpoint has no classifier: the head is freshly initialised")
            elif key.startswith("feature_norms.") and not ckpt_has_stage_norms:
                report.initialized[key] = "stage norms are not part of a classification checkpoint"
            elif key.startswith("norm.") and ckpt_has_stage_norms:
                report.initialized[key] = "detection checkpoint has no final norm"
            elif inflating and "rel_pos_t" in key:
                final[key] = torch.zeros_like(ref)
                report.adapted[key] = "zero temporal table (image -> video)"
            elif inflating and key == "cls_token":
                report.initialized[key] = "image checkpoint has no class token"
            else:
                report.missing.append(key)
            continue
        v = sd[key]
        if v.shape == ref.shape:
            final[key] = v
            continue
        fitted = _fit(key, v, ref.shape, model, inflation)
        if fitted is not None and fitted[0].shape == ref.shape:
            final[key], report.adapted[key] = fitted
        elif key.startswith("head."):
            n_ckpt = v.shape[0]
            report.initialized[key] = (
                f"head reset: checkpoint {n_ckpt} classes, model {ref.shape[0]}"
            )
            report.dropped[key] = report.initialized[key]
            head_notes.add(
                f"head reset: the checkpoint has {n_ckpt} classes and the model "
                f"{ref.shape[0]}; the new head is randomly initialised"
            )
        else:
            report.shape_conflicts.append((key, tuple(v.shape), tuple(ref.shape)))

    for key in sd:
        if key in target:
            continue
        if key.startswith("head."):
            report.dropped[key] = (
                "model has no classifier (features_only)"
                if features_only
                else "model has no classifier (num_classes=0)"
            )
            head_notes.add("checkpoint classifier skipped: the model has none")
        elif key.startswith("norm.") and features_only:
            report.dropped[key] = "features_only model uses per-stage norms instead"
        elif key.startswith("feature_norms.") and not features_only:
            report.dropped[key] = "per-stage (detection) norms; the model is a classifier"
        elif key in ("cls_token", "pos_embed_class"):
            # IN-21k `_cls` weights initialise backbones without a cls token (detectron2's
            # pretrain_use_cls_token): the token is the only tensor with no place.
            report.dropped[key] = "the model has no class token"
        else:
            report.unexpected.append(key)
    report.notes.extend(sorted(head_notes))
    report.loaded = sorted(final)
    return final


# --------------------------------------------------------------------------- whole detectors
def _wrapped_mvit_prefix(model: nn.Module) -> str | None:
    """For a model holding exactly one MViT below its root (a detector), that MViT's key
    prefix; None otherwise (an MViT itself, or any other model: loaded key by key)."""
    found = [name for name, m in model.named_modules() if name and isinstance(m, MViT)]
    return found[0] + "." if len(found) == 1 and not isinstance(model, MViT) else None


def _whole_detector(raw: object, report: LoadReport) -> tuple[StateDict, str, list[str]]:
    """A whole-detector checkpoint (detectron2) renamed to the detector's keys."""
    sd, _ = unwrap(raw)
    fmt = detect_format(sd)
    if fmt.name != "detectron2":
        raise ValueError(
            f"a {fmt.name} checkpoint holds a backbone only; a detector loads a whole detectron2 "
            "detector (.pkl / .pth) here. To initialise only the backbone use "
            "mvitv2.detection.load_backbone_weights(model, source)"
        )
    sd, adapted, not_loaded, unknown = convert_detectron2_detector(sd)
    report.adapted.update(adapted)
    report.dropped.update(not_loaded)
    report.unexpected.extend(unknown)
    return sd, fmt.name, ["detectron2 detector: backbone, FPN, RPN and RoI heads"]


def _plan_wrapper(
    model: nn.Module, prefix: str, sd: StateDict, report: LoadReport, inflation: str
) -> dict[str, Tensor]:
    """:func:`_plan` for the MViT under ``prefix`` (tables interpolated, kernels fitted, ...);
    every other tensor must match the model's key and shape exactly."""
    body = model.get_submodule(prefix[:-1])
    sub = LoadReport()
    inner = _plan(
        body, {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, sub, inflation
    )
    final = {prefix + k: v for k, v in inner.items()}
    report.missing += [prefix + k for k in sub.missing]
    report.unexpected += [prefix + k for k in sub.unexpected]
    report.shape_conflicts += [(prefix + k, a, b) for k, a, b in sub.shape_conflicts]
    for attr in ("adapted", "initialized", "dropped"):
        getattr(report, attr).update({prefix + k: v for k, v in getattr(sub, attr).items()})
    report.notes += sub.notes
    target = model.state_dict()
    for key, ref in target.items():
        if key.startswith(prefix):
            continue
        if key not in sd:
            if key.endswith(".num_batches_tracked"):
                report.initialized[key] = "BatchNorm step counter not in the checkpoint (unused)"
            else:
                report.missing.append(key)
        elif sd[key].shape != ref.shape:
            report.shape_conflicts.append((key, tuple(sd[key].shape), tuple(ref.shape)))
        else:
            final[key] = sd[key]
    report.unexpected += [k for k in sd if not k.startswith(prefix) and k not in target]
    report.loaded = sorted(final)
    return final


def _describe(source: object) -> str:
    if isinstance(source, Mapping):
        return "<state dict>"
    return str(source)


def _refuse_near_tag(name: str) -> None:
    """Refuse a missing ``name`` that is close to a weights tag (timm's ``mvitv2_tiny.fb_in1k``
    for ``mvitv2_tiny.in1k``), suggesting the tags; other missing files are read_checkpoint's."""
    close = difflib.get_close_matches(name, WEIGHTS, n=1, cutoff=0.6)
    if close:
        raise CheckpointNotFoundError(
            f"checkpoint file not found: {name}, nor a weights tag (did you mean {close[0]!r}? "
            "`mvitv2 info --weights` lists the tags)"
        )


#: where training scripts keep the EMA weights beside the plain ones: timm's train.py,
#: DeiT-style scripts (``model_ema``).
_EMA_KEYS = ("state_dict_ema", "model_ema")


def load_checkpoint(
    model: MViT,
    source: str | Path | Mapping,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    allow_pickle: bool = False,
    inflation: str = "centre",
    sha256: str | None = None,
    source_name: str | None = None,
) -> LoadReport:
    """Load weights from any supported checkpoint into an mvitv2 model.

    Args:
        model: an :class:`mvitv2.MViT` (classifier or ``features_only``, image or video).
        source: a file (``.pyth``, ``.pth``, ``.pt``, ``.safetensors``, detectron2 ``.pkl``), a
            released-weights tag (:func:`~mvitv2.weights.list_weights`, e.g.
            ``"mvitv2_tiny.in1k"``: its registered URL, downloaded and checked), a URL (``https://`` or ``file://``, downloaded once into torch.hub's cache), or a state
            dict / checkpoint dict. The layout (official image, SlowFast video, detectron2, timm,
            torchvision, mvitv2's own) is detected and converted.
        strict: raise :class:`CheckpointMismatchError` (listing missing and unexpected keys and
            shape conflicts) when anything besides the classifier / stage norms does not fit;
            False loads what fits and returns those lists in the report.
        map_location: device the checkpoint tensors are read onto.
        allow_pickle: allow full unpickling of detectron2 ``.pkl`` files (they can run code; only
            for files you trust). Other files are always read with ``weights_only=True``.
        inflation: image -> video kernel inflation: ``"centre"`` (paper) or ``"repeat"``
            (SlowFast: copied over time, divided by T).
        sha256: expected sha256 of a URL's file (a torchvision-style hash prefix in the file name
            is checked when this is None).
        source_name: how errors and the report name the source (default: ``source``, or
            ``"<state dict>"`` for a dict, e.g. one the caller read from a file).

    Returns:
        A :class:`LoadReport` of what was loaded, adapted, re-initialised and skipped.
    """
    if inflation not in _INFLATIONS:
        raise ValueError(f"inflation must be one of {_INFLATIONS}, got {inflation!r}")
    report = LoadReport(source=source_name or _describe(source))
    if isinstance(source, Mapping):
        raw = source
    elif is_url(source):
        raw = read_checkpoint(
            download(str(source), sha256), map_location=map_location, allow_pickle=allow_pickle
        )
    elif isinstance(source, str) and is_weights_tag(source):
        w = get_weights(source)  # a released-weights tag: its registered URL and digest
        raw = read_checkpoint(
            download(w.url, w.sha256), map_location=map_location, allow_pickle=allow_pickle
        )
    else:
        if isinstance(source, str) and not Path(source).exists():
            _refuse_near_tag(source)
        raw = read_checkpoint(source, map_location=map_location, allow_pickle=allow_pickle)
    prefix = _wrapped_mvit_prefix(model)
    try:
        if prefix is None:
            sd, report.format, notes = convert_state_dict(raw, return_info=True)
        else:
            sd, report.format, notes = _whole_detector(raw, report)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{report.source}: {e}") from e
    report.notes.extend(notes)
    ema = next((k for k in _EMA_KEYS if isinstance(raw.get(k), Mapping)), None)
    if ema is not None:  # timm's validate.py and ours load the plain weights too; say so
        report.notes.append(
            f"the file also holds EMA weights under {ema!r}, not loaded (to load them, pass "
            f"checkpoint[{ema!r}] as the source)"
        )

    if prefix is None:
        final = _plan(model, sd, report, inflation)
    else:
        final = _plan_wrapper(model, prefix, sd, report, inflation)
    if not final:
        report.notes.append("nothing in the checkpoint fits this model")
    if not report.ok or not final:
        msg = (
            f"checkpoint {report.source} (detected format: {report.format}) does not fit "
            f"{type(model).__name__}: {len(final)} tensors fit.\n{report.problems()}"
        )
        if strict or not final:
            raise CheckpointMismatchError(msg, report)
        log.warning("%s", msg)

    result = model.load_state_dict(final, strict=False)
    expected_missing = (
        set(report.missing) | set(report.initialized) | {k for k, *_ in report.shape_conflicts}
    )
    assert set(result.missing_keys) <= expected_missing, result.missing_keys  # planning bug
    if report.initialized:
        log.info("%s", report)
    return report
