"""Value tests of detectron2 detector loading (``mvitv2.detection.detectron2``) and the traced
mask pasting (``mvitv2.detection.components``) for what ``test_detectron2_detectors`` leaves open
(mutmut survivors), against detectron2's own fixtures (``tests/data``, written by
``tools/make_detectron2_fixture.py``), COCO's category ids, the registry's detectron2 model-zoo
URLs, the per-box mask pasting and values written out by hand."""

from __future__ import annotations

import pytest
import torch

from mvitv2.detection import load_detectron2_detector
from mvitv2.detection.components import _paste_masks_traced, paste_masks
from mvitv2.detection.detectron2 import _backbone, coco_category_ids
from mvitv2.weights import CheckpointError
from test_detectron2_detectors import NAMES, backbone_overrides, reference


# --------------------------------------------------------------------------- detectron2.py
def test_coco_category_ids_map_label_0_to_0_on_the_labels_device() -> None:
    """Label ``c + 1`` is COCO's ``c``-th annotated id (12, 26, 29, 30, 45, 66, 68, 69, 71 and 83
    skipped); label 0 (no class) stays 0, not person's 1; the ids are on the labels' device (the
    meta device here: a table left on the CPU gives CPU ids)."""
    labels = torch.tensor([0, 1, 11, 12, 25, 80])
    assert coco_category_ids(labels).tolist() == [0, 1, 11, 13, 27, 90]
    meta = coco_category_ids(torch.zeros(5, dtype=torch.int64, device="meta"))
    assert (meta.device.type, meta.shape, meta.dtype) == ("meta", (5,), torch.int64)


def test_a_registered_pickle_is_refused_in_full_before_any_download() -> None:
    url = (
        "https://dl.fbaipublicfiles.com/detectron2/MViTv2/cascade_mask_rcnn_mvitv2_t_3x/"
        "f308344828/model_final_c6967a.pkl"
    )
    with pytest.raises(CheckpointError) as err:
        load_detectron2_detector("mvitv2_tiny.coco_cascade")
    assert str(err.value) == (
        f"weights mvitv2_tiny.coco_cascade ({url}) are a detectron2 pickle, which can run code "
        "when loaded. If you trust the source, pass allow_pickle=True."
    )


def test_backbone_of_a_registered_detector_has_its_overrides() -> None:
    """The backbone fields of a registered detector are its variant's with the detector's
    overrides: detectron2's windows (56, 28, 14, 7 tokens), its drop path, and for L the width
    expansion inside attention."""
    embed, depths, fields = _backbone("cascade_maskrcnn_mvitv2_large")
    assert (embed, depths) == (144, (2, 6, 36, 4))
    assert fields["window_size"] == (56, 28, 14, 7)
    assert (fields["drop_path_rate"], fields["expand_attn"]) == (0.5, True)
    assert (fields["embed_dim"], fields["depths"]) == (144, (2, 6, 36, 4))
    _, _, tiny = _backbone("maskrcnn_mvitv2_tiny")
    assert (tiny["window_size"], tiny["drop_path_rate"]) == ((56, 28, 14, 7), 0.2)


def test_the_file_is_read_onto_map_location(tmp_path) -> None:
    """The file's tensors are read onto ``map_location``: read onto the meta device, they have no
    values to copy into the model (read onto the CPU, the default, they load)."""
    sd, info = reference("maskrcnn")
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd}, path)
    overrides = backbone_overrides(info)
    with pytest.raises(RuntimeError, match="Cannot copy out of meta tensor"):
        load_detectron2_detector(path, NAMES["maskrcnn"], map_location="meta", **overrides)
    assert load_detectron2_detector(path, NAMES["maskrcnn"], **overrides).report.ok


# --------------------------------------------------------------------------- components.py
def test_traced_mask_pasting_works_on_the_masks_device_and_in_their_dtype() -> None:
    """The traced (whole-image) pasting builds its pixel grid on the masks' device (meta here,
    which refuses to mix with CPU tensors) and samples in the masks' dtype: float64 masks in
    float32 boxes give the per-box pasting's float64 values."""
    masks = torch.rand(2, 1, 4, 4, device="meta")
    boxes = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0]], device="meta")
    out = _paste_masks_traced(masks, boxes, (8, 9))
    assert (out.device.type, out.shape) == ("meta", (2, 1, 8, 9))
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[1.3, 2.2, 5.6, 6.1], [0.0, 0.5, 3.2, 3.9]])  # float32
    traced = _paste_masks_traced(masks, boxes, (8, 9))
    assert traced.dtype == torch.float64
    torch.testing.assert_close(traced, paste_masks(masks, boxes, (8, 9)), atol=1e-6, rtol=0)
