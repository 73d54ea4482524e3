"""Adapters from the Hugging Face Hub (``hub:owner/name``): the download call, with the size checked first in
demo mode, and the upload of a merged adapter (:func:`upload`, ``MergedAdapter.push_to_hub``). Tests mock
:func:`snapshot_download` and :class:`HfApi` here, nothing else."""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any

from geometry.errors import AdapterLoadError
from geometry.io.limits import is_demo
from geometry.io.limits import limits as current_limits


def __getattr__(name: str) -> Any:
    """``hub.snapshot_download`` / ``hub.HfApi``, imported on first use: importing huggingface_hub costs about
    0.4 s that a dashboard's first visit, which loads local adapters only, does not need. Tests replace them with
    ``monkeypatch.setattr(hub, name, fake)``."""
    if name in ("snapshot_download", "HfApi"):
        return getattr(importlib.import_module("huggingface_hub"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf(name: str) -> Any:
    """The replaced function when a test set one on this module, else huggingface_hub's own."""
    return globals()[name] if name in globals() else __getattr__(name)

#: peft adapter files, and diffusers' LoRA file (a diffusion LoRA with no config, geometry.io.diffusion).
HUB_PATTERNS = ["*adapter_config.json", "*adapter_model.safetensors", "*adapter_model.bin",
                "*pytorch_lora_weights.safetensors"]


def _hub_size(repo_id: str, revision: str | None) -> int:
    """Total bytes of the adapter files of ``repo_id`` (``HfApi.model_info`` with file sizes), before download."""

    info = _hf("HfApi")().model_info(repo_id, revision=revision, files_metadata=True)
    sizes = [f.size for f in info.siblings or [] if any(fnmatch.fnmatch(f.rfilename, p) for p in HUB_PATTERNS)]
    if any(size is None for size in sizes):
        raise AdapterLoadError(f"hub:{repo_id}: the hub does not say how large its adapter files are, so this "
                               "server cannot check them against its limit before downloading")
    return sum(sizes)


def download(repo_id: str, revision: str | None = None, max_bytes: int | None = None) -> str:
    """Download the adapter files of ``repo_id`` with ``huggingface_hub.snapshot_download``; their local folder.

    ``max_bytes``: refuse, before downloading anything, a repository whose adapter files are larger (their
    sizes come from the hub's file metadata). Default: the upload limit in demo mode
    (:mod:`geometry.io.limits`), no cap otherwise.
    """
    if max_bytes is None and is_demo():
        max_bytes = current_limits().max_upload_bytes
    try:
        total = _hub_size(repo_id, revision) if max_bytes is not None else None
        if total is not None and total > max_bytes:
            raise AdapterLoadError(f"hub:{repo_id}: its adapter files are {total} bytes, more than this server's "
                                   f"limit of {max_bytes} bytes; nothing was downloaded")
        folder = _hf("snapshot_download")(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except AdapterLoadError:
        raise
    except Exception as exc:  # network, auth, missing repo: one sentence for the user
        raise AdapterLoadError(f"hub:{repo_id}: download failed ({type(exc).__name__}: {exc})") from exc
    return folder


def upload(folder: str, repo_id: str, *, token: str | None = None, private: bool = True,
           commit_message: str | None = None) -> str:
    """Upload the files of ``folder`` to the model repository ``repo_id`` (created if missing, ``private`` when
    created) with ``HfApi().create_repo(..., exist_ok=True)`` and ``upload_folder``; the repository's URL.

    Any failure of the hub (network, token, permissions, a bad id) is one :class:`AtlasError` line.
    """
    from geometry.errors import AtlasError

    try:
        api = _hf("HfApi")(token=token)
        repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), token=token,
                          commit_message=commit_message or "Upload merged LoRA adapter (Adapter Atlas)")
    except Exception as exc:  # network, auth, permissions, invalid id: one sentence for the user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AtlasError(f"push to hub {repo_id}: upload failed ({type(exc).__name__}"
                         + (f": {detail})" if detail else ")")) from exc
    url = getattr(repo, "url", None) or (repo if isinstance(repo, str) else None)
    return str(url or f"https://huggingface.co/{repo_id}")
