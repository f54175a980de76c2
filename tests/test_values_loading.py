"""load_checkpoint's fitting and report by value, on cases the layout round-trips do not reach:
position embeddings whose length fits no grid, non-square grids, exact messages.

References are written here: the model's own shapes, torch's interpolation called with the
target grid spelled out, and the report texts of the design doc's loading rules."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import pickle
import urllib.error
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mvitv2
from mvitv2.errors import CheckpointNotFoundError
from mvitv2.weights import CheckpointError, CheckpointMismatchError, io, load_checkpoint, registry
from mvitv2.weights import load as load_mod
from mvitv2.weights.io import read_checkpoint
from mvitv2.weights.load import _wrapped_mvit_prefix

SMALL = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=2, img_size=32, num_classes=5)


def randomized(model: mvitv2.MViT, seed: int = 0) -> mvitv2.MViT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("length", [3, 24, 48, 63])
def test_a_pos_embed_of_no_grid_length_is_a_conflict_for_a_cls_model(length):
    """A class-token model takes ``1 + h*w`` (or ``h*w`` plus a class slot to drop) positions;
    a length that is neither (some one short of a square: 3, 24, 48) is a shape conflict."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL, use_abs_pos=True, use_cls_token=True)
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.ones(1, length, 16)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    assert e.value.report.shape_conflicts == [("pos_embed", (1, length, 16), (1, 65, 16))]
    assert e.value.report.missing == [] and e.value.report.unexpected == []


def test_an_image_pos_embed_of_no_grid_length_leaves_the_video_class_slot_missing():
    """An image ``pos_embed`` whose length is neither ``h*w`` nor ``1 + h*w`` has no class slot:
    the video model's ``pos_embed_class`` is missing, the whole tensor is the spatial part (a
    conflict), not a class slot plus 62 positions."""
    img = mvitv2.create_model("mvitv2_tiny", **SMALL, use_abs_pos=True, use_cls_token=True)
    vid = mvitv2.create_model("mvitv2_small_16x4", **SMALL, num_frames=4, use_abs_pos=True)
    sd = dict(img.state_dict())
    sd["pos_embed"] = torch.ones(1, 63, 16)
    report = load_checkpoint(vid, sd, strict=False)
    assert report.missing == ["pos_embed_class"]
    assert report.shape_conflicts == [("pos_embed_spatial", (1, 63, 16), (1, 64, 16))]
    assert report.unexpected == []


def test_video_spatial_pos_embed_interpolates_to_a_non_square_grid_height_first():
    """32 px -> 48x40 px: the 8x8 spatial grid becomes 12 rows by 10 columns (bicubic)."""
    v1 = dict(SMALL, num_frames=4)
    src = randomized(mvitv2.create_model("mvitv1_base_16x4", **v1))
    dst = mvitv2.create_model("mvitv1_base_16x4", **{**v1, "img_size": (48, 40)})
    report = load_checkpoint(dst, src.state_dict())
    assert report.adapted == {"pos_embed_spatial": "interpolated 8x8 -> 12x10"}
    grid = src.state_dict()["pos_embed_spatial"][0].T.reshape(1, 16, 8, 8)
    want = F.interpolate(grid, size=(12, 10), mode="bicubic").reshape(16, 120).T
    assert torch.allclose(dst.state_dict()["pos_embed_spatial"][0], want, rtol=0, atol=1e-6)


def test_a_kernel_of_another_rank_is_a_conflict_not_inflated():
    """Only a 2-D kernel ``(O, I, kh, kw)`` (or its ``T = 1`` 5-D form) is inflated; a 3-D one
    whose trailing sizes happen to match is a conflict."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL)
    sd = dict(model.state_dict())
    sd["patch_embed.proj.weight"] = torch.ones(16, 3, 7)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    assert e.value.report.shape_conflicts == [
        ("patch_embed.proj.weight", (16, 3, 7), (16, 3, 7, 7))
    ]
    assert e.value.report.adapted == {}


def test_head_notes_say_whether_the_checkpoint_or_the_model_lacks_a_classifier():
    src = mvitv2.create_model("mvitv2_tiny", **SMALL).state_dict()
    body = {k: v for k, v in src.items() if not k.startswith("head.")}
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), body)
    assert report.notes == ["checkpoint has no classifier: the head is freshly initialised"]
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **{**SMALL, "num_classes": 0}), src)
    assert report.notes == ["checkpoint classifier skipped: the model has none"]


@pytest.mark.parametrize("mode", ["centre", "repeat"])
def test_an_image_checkpoint_without_class_token_inflates_and_leaves_the_video_token_fresh(mode):
    img = mvitv2.create_model("mvitv2_tiny", **SMALL)
    vid = mvitv2.create_model("mvitv2_small_16x4", **SMALL, num_frames=4)
    fresh = vid.cls_token.detach().clone()
    report = load_checkpoint(vid, img.state_dict(), inflation=mode)
    assert report.initialized == {"cls_token": "image checkpoint has no class token"}
    assert f"image checkpoint inflated into a video model ({mode})" in report.notes
    assert torch.equal(vid.cls_token, fresh) and report.ok


def test_class_token_and_its_position_are_dropped_for_a_video_model_without_a_class_token():
    kw = dict(SMALL, num_frames=4, use_abs_pos=True)
    src = mvitv2.create_model("mvitv2_small_16x4", **kw).state_dict()
    assert {"cls_token", "pos_embed_class"} <= set(src)
    dst = mvitv2.create_model("mvitv2_small_16x4", **kw, use_cls_token=False)
    report = load_checkpoint(dst, src)
    assert report.dropped == dict.fromkeys(
        ["cls_token", "pos_embed_class"], "the model has no class token"
    )
    assert report.ok and report.initialized == {}


def test_a_detection_backbone_checkpoint_lacking_a_block_tensor_reports_it_missing():
    """Stage norms excuse only the final norm of a classifier, never a missing block tensor."""
    feat = mvitv2.create_model("mvitv2_tiny", **SMALL, features_only=True)
    sd = {k: v for k, v in feat.state_dict().items() if k != "blocks.0.norm1.bias"}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL, features_only=True), sd)
    assert e.value.report.missing == ["blocks.0.norm1.bias"]
    assert e.value.report.initialized == {}
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), feat.state_dict())
    why = "detection checkpoint has no final norm"
    assert {k: v for k, v in report.initialized.items() if k.startswith("norm.")} == {
        "norm.weight": why,
        "norm.bias": why,
    }


def _pickled_official(model: mvitv2.MViT, path) -> None:
    """A pickle of numpy arrays (what detectron2's model zoo ships), in the official layout."""
    with open(path, "wb") as f:
        pickle.dump({"model_state": {k: v.numpy() for k, v in model.state_dict().items()}}, f)


def test_sources_are_read_with_the_callers_device_and_pickle_choice(tmp_path, monkeypatch):
    """A path (str or Path), a file:// URL and a registered tag are all read by
    ``read_checkpoint`` with the caller's ``map_location`` and ``allow_pickle``; a pickle at a URL
    loads only with the opt-in."""
    src = randomized(mvitv2.create_model("mvitv2_tiny", **SMALL))
    _pickled_official(src, tmp_path / "w.pkl")
    url = (tmp_path / "w.pkl").as_uri()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(
        registry.WEIGHTS,
        "test.tiny",
        dataclasses.replace(registry.WEIGHTS["mvitv2_tiny.in1k"], url=url, sha256=None),
    )
    calls = []

    def spy(path, *, map_location, allow_pickle):
        calls.append((map_location, allow_pickle))
        return read_checkpoint(path, map_location=map_location, allow_pickle=allow_pickle)

    monkeypatch.setattr(load_mod, "read_checkpoint", spy)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), url)
    for source in (url, "test.tiny", str(tmp_path / "w.pkl"), tmp_path / "w.pkl"):
        dst = mvitv2.create_model("mvitv2_tiny", **SMALL)
        calls.clear()
        report = load_checkpoint(dst, source, map_location="cpu:0", allow_pickle=True)
        assert calls == [("cpu:0", True)] and report.ok and report.source == str(source)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    # A tag's registered digest is checked (here against the file cached above).
    entry = dataclasses.replace(registry.WEIGHTS["test.tiny"], sha256="0" * 64)
    monkeypatch.setitem(registry.WEIGHTS, "test.tiny", entry)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), "test.tiny", allow_pickle=True)


def test_a_local_file_named_like_a_weights_tag_is_read_not_downloaded(tmp_path, monkeypatch):
    src = randomized(mvitv2.create_model("mvitv2_tiny", **SMALL))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.save(src.state_dict(), tmp_path / "mvitv2_tiny.in1k")
    dst = mvitv2.create_model("mvitv2_tiny", **SMALL)
    assert load_checkpoint(dst, "mvitv2_tiny.in1k").ok
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    assert not (tmp_path / "hub").exists()


def test_only_a_model_holding_exactly_one_mvit_is_a_wrapper():
    """A detector (one MViT below the root) is loaded whole under that MViT's prefix; an MViT
    itself, or a module holding none or two, is not a wrapper."""
    one = mvitv2.create_model("mvitv2_tiny", **SMALL)
    assert _wrapped_mvit_prefix(torch.nn.Sequential(torch.nn.Identity(), one)) == "1."
    assert _wrapped_mvit_prefix(one) is None
    assert _wrapped_mvit_prefix(torch.nn.Linear(2, 2)) is None
    assert _wrapped_mvit_prefix(torch.nn.ModuleList([one, copy.deepcopy(one)])) is None


def test_a_load_that_fits_nothing_fails_even_when_not_strict():
    sd = {"patch_embed.proj.weight": torch.ones(3), "blocks.0.norm1.weight": torch.ones(3)}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), sd, strict=False)
    assert e.value.report.notes[-1] == "nothing in the checkpoint fits this model"
    assert str(e.value).startswith(
        "checkpoint <state dict> (detected format: official) does not fit MViT: 0 tensors fit.\n"
        "  missing keys (in the model, not in the checkpoint) ("
    )


def test_a_partial_load_warns_with_its_problems_and_a_reset_is_logged(caplog):
    """strict=False logs the refused part as a warning (the strict error's text); re-initialised
    tensors are logged at INFO with the report."""
    src = mvitv2.create_model("mvitv2_tiny", **SMALL).state_dict()
    sd = {k: v for k, v in src.items() if k != "blocks.0.norm1.bias"}
    with caplog.at_level(logging.INFO, logger="mvitv2.weights.load"):
        report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), sd, strict=False)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "checkpoint <state dict> (detected format: official) does not fit MViT: "
        f"{len(src) - 1} tensors fit.\n{report.problems()}"
    )
    caplog.clear()
    headless = {k: v for k, v in src.items() if not k.startswith("head.")}
    with caplog.at_level(logging.INFO, logger="mvitv2.weights.load"):
        report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), headless)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, str(report))]


# --------------------------------------------------------------------------- weights.io
def test_urls_are_http_https_or_file_strings():
    for url in ("http://h/w.pth", "https://h/w.pth", "file:///tmp/w.pth"):
        assert io.is_url(url)
    for other in ("ftp://h/w.pth", "/tmp/w.pth", "w.pth", "https:/h", Path("https://h/w.pth")):
        assert not io.is_url(other)


def test_cache_paths_and_hashes_from_the_url(tmp_path, monkeypatch):
    """The cache file is torch.hub's ``checkpoints/<file name>`` (query ignored); the expected
    hash is the given digest (lower case) or the 8-64 hex digits before the suffix."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert io.cache_dir() == tmp_path / "hub" / "checkpoints"
    url = "https://h.org/models/mvit_v2_s-ae3be167.pth?download=1"
    assert io.cached_path(url) == tmp_path / "hub" / "checkpoints" / "mvit_v2_s-ae3be167.pth"
    assert io.expected_hash(url, None) == "ae3be167"
    assert io.expected_hash(url, "ABCDEF12") == "abcdef12"
    assert io.expected_hash("https://h/m-" + "0a" * 32 + ".pyth", None) == "0a" * 32
    for name in ("m-ae3be16.pth", "m-AE3BE167.pth", "m_ae3be167.pth", "m-ae3be167-x.pth"):
        assert io.expected_hash(f"https://h/{name}", None) is None, name


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 3)  # 5 MiB and a bit: several 1 MiB reads
    (tmp_path / "f").write_bytes(data)
    assert io.sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_verify_accepts_the_digest_or_its_prefix_and_names_both_on_a_mismatch(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    io.verify(path, "https://h/w.pth", digest)
    io.verify(path, f"https://h/w-{digest[:8]}.pth", None)
    io.verify(tmp_path / "absent.pth", "https://h/w.pth", None)  # nothing known: not even read
    with pytest.raises(CheckpointError) as e:
        io.verify(path, "https://h/w.pth", "0" * 64)
    assert str(e.value) == (
        f"sha256 mismatch for {path} (from https://h/w.pth): expected {'0' * 64}, got {digest}. "
        "The file is corrupt or not the published one; delete it and download again."
    )


def test_download_fetches_once_with_the_hash_checked_and_progress_on_request(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub" / "deeper"))
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    got = io.download(src.as_uri(), digest.upper(), progress=False)
    assert got == tmp_path / "hub" / "deeper" / "checkpoints" / "w.pth"
    assert got.read_bytes() == b"weights" and capfd.readouterr().err == ""
    src.unlink()
    assert io.download(src.as_uri(), digest) == got  # from the cache, verified
    with pytest.raises(CheckpointError, match="sha256 mismatch for"):
        io.download(src.as_uri(), "0" * 64)

    other = tmp_path / "v.pth"
    other.write_bytes(b"other")
    capfd.readouterr()
    io.download(other.as_uri())
    assert "100%" in capfd.readouterr().err  # a progress bar by default
    bad = tmp_path / "u.pth"
    bad.write_bytes(b"other")
    with pytest.raises(CheckpointError, match=f"^sha256 mismatch downloading {bad.as_uri()}: "):
        io.download(bad.as_uri(), "0" * 64, progress=False)
    assert not io.cached_path(bad.as_uri()).exists()


def test_download_lets_an_unexpected_runtime_error_through(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def broken(*args, **kwargs):
        raise RuntimeError("internal failure")

    monkeypatch.setattr(torch.hub, "download_url_to_file", broken)
    with pytest.raises(RuntimeError, match="^internal failure$"):
        io.download("https://h/w.pth")


def test_read_checkpoint_formats_and_one_line_errors(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(state, tmp_path / "w.SafeTensors")
    got = io.read_checkpoint(tmp_path / "w.SafeTensors", map_location=torch.device("cpu"))
    assert torch.equal(got["w"], state["w"])
    assert torch.equal(io.read_checkpoint(str(tmp_path / "w.SafeTensors"))["w"], state["w"])

    missing = tmp_path / "absent.pth"
    with pytest.raises(CheckpointNotFoundError) as e:
        io.read_checkpoint(missing)
    assert str(e.value) == f"checkpoint file not found: {missing}"
    with pytest.raises(CheckpointNotFoundError):
        io.read_checkpoint(tmp_path)  # a folder is not a checkpoint file

    # detectron2's older model-zoo pickles hold Python 2 byte strings: read as latin-1.
    (tmp_path / "d2.PKL").write_bytes(b"\x80\x02}q\x00U\x01\xffq\x01K\x07s.")
    with pytest.raises(CheckpointError) as e:
        io.read_checkpoint(tmp_path / "d2.PKL")
    assert str(e.value) == (
        f"{tmp_path / 'd2.PKL'} is a Python pickle (detectron2 model zoo .pkl), which can run "
        "arbitrary code when loaded. If you trust it, pass allow_pickle=True to load it."
    )
    assert io.read_checkpoint(tmp_path / "d2.PKL", allow_pickle=True) == {"\xff": 7}

    torch.save(state, tmp_path / "w.pth")
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((tmp_path / "w.pth").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"^{truncated} is not a readable torch checkpoint: "):
        io.read_checkpoint(truncated)
    torch.save({"w": state["w"], "x": _NotATensor()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError) as e:
        io.read_checkpoint(tmp_path / "obj.pth")
    assert str(e.value).startswith(
        f"{tmp_path / 'obj.pth'} holds Python objects besides tensors, which "
        "torch.load(weights_only=True) refuses ("
    )
    with pytest.raises(pickle.UnpicklingError) as refused:  # torch's own refusal, first line
        torch.load(tmp_path / "obj.pth", weights_only=True)
    assert f"refuses ({str(refused.value).splitlines()[0]}). " in str(e.value)
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "If you trust the file, load it yourself with torch.load(path, weights_only=False) and "
        "pass the resulting dict as the source."
    )


def test_read_checkpoint_puts_tensors_on_map_location(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pth")
    assert io.read_checkpoint(tmp_path / "w.pth", map_location="meta")["w"].is_meta
    # safetensors takes the device as a string; a torch.device is spelled out for it.
    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    devices = []

    def spy(filename, **kwargs):
        devices.append(kwargs.get("device"))
        return load_file(filename, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    for where in ("cpu", torch.device("cpu"), torch.device("cpu", 0), "cpu:0"):
        assert torch.equal(
            io.read_checkpoint(tmp_path / "w.safetensors", map_location=where)["w"], torch.ones(2)
        )
    assert devices == ["cpu"] * 4
    # Other devices are passed as torch spells them ("cuda:1"), which safetensors accepts.
    monkeypatch.setattr(safetensors.torch, "load_file", lambda f, device: device)
    assert io.read_checkpoint(tmp_path / "w.safetensors", map_location="cuda:1") == "cuda:1"


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = "https://h.org/m/w.pth"
    with pytest.raises(CheckpointError) as e:
        io.download(url)
    dst = tmp_path / "hub" / "checkpoints" / "w.pth"
    assert str(e.value) == (
        f"could not download {url} (<urlopen error no network>). Without internet access, fetch "
        f"that URL on another machine and put the file at exactly {dst} (the cache is "
        "torch.hub.get_dir(); set TORCH_HOME to move it), then run again."
    )


class _NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse it
    pass


def test_a_missing_name_close_to_a_weights_tag_suggests_the_tags(tmp_path, monkeypatch):
    """timm spells the tags differently (``mvitv2_tiny.fb_in1k``); such a name that is no file
    is refused naming the close registered tags. A missing path far from every tag gets the
    plain message, and a file of that name is read as the file."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL)
    with pytest.raises(CheckpointNotFoundError) as e:
        load_checkpoint(model, "mvitv2_tiny.fb_in1k")
    assert str(e.value) == (
        "checkpoint file not found: mvitv2_tiny.fb_in1k, nor a weights tag (did you mean "
        "'mvitv2_tiny.in1k'? `mvitv2 info --weights` lists the tags)"
    )
    # difflib's ratio 2 * 8 matching / 24 characters = 0.67, above the 0.6 cutoff
    with pytest.raises(CheckpointNotFoundError, match="did you mean 'mvitv2_tiny.in1k'"):
        load_checkpoint(model, "mvitv2_t")
    missing = str(tmp_path / "runs" / "best.pt")
    with pytest.raises(CheckpointNotFoundError) as e:
        load_checkpoint(model, missing)
    assert str(e.value) == f"checkpoint file not found: {missing}"
    monkeypatch.chdir(tmp_path)
    torch.save(model.state_dict(), "mvitv2_tiny.fb_in1k")
    assert load_checkpoint(model, "mvitv2_tiny.fb_in1k").missing == []
