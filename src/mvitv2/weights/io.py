"""Reading checkpoint files and URLs safely, and downloading into torch.hub's cache."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from mvitv2.errors import CheckpointError, CheckpointNotFoundError, UserCheckpointError

__all__ = ["CheckpointError", "cache_dir", "download", "read_checkpoint"]

_URL_SCHEMES = ("http://", "https://", "file://")
# torchvision-style names carry the first hex digits of the file's sha256: mvit_v2_s-ae3be167.pth
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[a-z]+$")


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.startswith(_URL_SCHEMES)


def cache_dir() -> Path:
    """Where downloaded weights live: ``torch.hub.get_dir()/checkpoints`` (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(url: str) -> Path:
    """The cache file a URL downloads to."""
    return cache_dir() / os.path.basename(urlparse(url).path)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_hash(url: str, sha256: str | None) -> str | None:
    """The full sha256 if known, else the prefix embedded in a torchvision-style file name."""
    if sha256:
        return sha256.lower()
    m = _HASH_IN_NAME.search(os.path.basename(urlparse(url).path))
    return m[1] if m else None


def verify(path: Path, url: str, sha256: str | None) -> None:
    """Raise UserCheckpointError if the file's sha256 does not match what is known for ``url``."""
    want = expected_hash(url, sha256)
    if want is None:
        return
    got = sha256_of(path)
    if not got.startswith(want):
        raise UserCheckpointError(
            f"sha256 mismatch for {path} (from {url}): expected {want}, got {got}. "
            "The file is corrupt or not the published one; delete it and download again."
        )


def download(url: str, sha256: str | None = None, *, progress: bool = True) -> Path:
    """Download ``url`` into :func:`cache_dir` once, checking its sha256 when known.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        sha256: full hex digest, or None (then a hash prefix in the file name is checked, if any).
        progress: show a progress bar.

    Returns:
        The cached file. A file already in the cache is verified, not fetched again.

    Raises:
        UserCheckpointError: on a hash mismatch, or when the download fails (offline): the message
            names the URL to fetch and the exact path to put the file at.
    """
    dst = cached_path(url)
    if dst.exists():
        verify(dst, url, sha256)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    want = expected_hash(url, sha256)
    try:
        # Writes to a temporary file and moves it into place only after the hash check.
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=want, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" in str(e):
            raise UserCheckpointError(f"sha256 mismatch downloading {url}: {e}") from e
        raise
    except (urllib.error.URLError, OSError) as e:
        raise UserCheckpointError(
            f"could not download {url} ({e}). Without internet access, fetch that URL on another "
            f"machine and put the file at exactly {dst} (the cache is torch.hub.get_dir(); set "
            "TORCH_HOME to move it), then run again."
        ) from e
    return dst


def read_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", allow_pickle: bool = False
) -> object:
    """Load a checkpoint file without executing code from it.

    A file that cannot be read this way is the user's (:class:`UserCheckpointError`: one line
    and exit status 2 from the command line), like a missing one, a failed download (offline) or
    a corrupt one.

    Args:
        path: ``.pyth`` / ``.pth`` / ``.pt`` / ``.bin`` (torch zip or legacy format, read with
            ``weights_only=True``), ``.safetensors``, or ``.pkl`` (detectron2 model zoo: a pickle
            of numpy arrays).
        map_location: device for the tensors.
        allow_pickle: permit full unpickling of ``.pkl`` files, which can run arbitrary code:
            only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        device = torch.device(map_location)  # safetensors spells the CPU "cpu" (never "cpu:0")
        try:
            return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))
        except SafetensorError as e:  # a truncated or foreign file: the user's, not a bug
            raise UserCheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if suffix == ".pkl":
        if not allow_pickle:
            raise UserCheckpointError(
                f"{path} is a Python pickle (detectron2 model zoo .pkl), which can run arbitrary "
                "code when loaded. If you trust it, pass allow_pickle=True to load it."
            )
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # noqa: S301 - explicit opt-in above
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserCheckpointError(
            f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) "
            f"refuses ({str(e).splitlines()[0]}). If you trust the file, load it yourself with "
            "torch.load(path, weights_only=False) and pass the resulting dict as the source."
        ) from e
    except RuntimeError as e:
        raise UserCheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
