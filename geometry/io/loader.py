"""Load peft LoRA adapters from a folder, a ``.zip`` (path or bytes), a config + weights pair, or the hub.

Every source ends in :func:`build_adapter`, which reads ``adapter_config.json`` (see
:mod:`geometry.io.config`), the weights (``adapter_model.safetensors``, or ``adapter_model.bin``
through ``torch.load(..., weights_only=True)`` only), separates LoRA factors from other tensors,
validates shapes, ranks and finiteness, and keys every module with :mod:`geometry.io.naming`.

Formats read:

* ``<module>.lora_A.weight`` ``(r, n)`` and ``<module>.lora_B.weight`` ``(m, r)`` (optionally with an
  adapter name before ``.weight``); ``tau = s * B @ A``.
* DoRA ``<module>.lora_magnitude_vector``: attached as ``LoraModule.magnitude``; tau is the LoRA direction
  until :func:`geometry.linalg.dora.resolve_dora` attaches the base weights' exact update.
* AdaLoRA (``peft_type: ADALORA``) ``<module>.lora_A`` / ``lora_B`` / ``lora_E`` (no ``.weight``): the factors
  ``B`` and ``diag(E) A`` at scale ``lora_alpha / (init_r + 1e-5)``, the ranks left by pruning
  (``rank_pattern`` masks, components with ``E = 0`` left out).
* Half-precision factors (float16 / bfloat16) are converted to float32 at load: nothing computes in half.
* Embedding LoRA ``lora_embedding_A (r, vocab)`` / ``lora_embedding_B (dim, r)``: kind ``embed``,
  ``is_embedding=True``, tau ``= s * B @ A`` of shape ``(dim, vocab)``.
* Legacy peft <= 0.2 merged LoRA (``enable_lora`` in the config, ``B`` a grouped ``Conv1d`` weight
  ``(m_g * G, r, 1)`` with ``G = sum(enable_lora)`` groups, ``A`` ``(G * r, n)``): peft 0.2 computed
  ``zero_pad(conv1d(A x, B, groups=G)) * alpha / r``, i.e. group ``g`` uses rows ``g*r .. (g+1)*r`` of
  ``A`` and writes the ``g``-th enabled block of ``out / len(enable_lora)`` output rows. This is loaded
  exactly as one fused module with ``A`` (all ``G * r`` rows) and a block-structured ``B`` of
  ``(out, G * r)`` (zero outside the enabled row blocks), or, where the module splits into
  contiguous thirds (GPT-2 ``c_attn``), as one part per enabled third with its own ``A`` group.
* Fused ``q|k|v`` in contiguous thirds (GPT-2 ``c_attn``, Phi-3 ``self_attn.qkv_proj`` without
  grouped-query attention, see :mod:`geometry.io.naming`): one :class:`LoraModule` per third, ``B``
  rows sliced, ``A`` shared, ``rows`` set. A fused module that cannot be split (Phi-4 / GQA shapes)
  stays ``qkv`` and ``Adapter.warnings`` says why.
  BLOOM's ``query_key_value`` interleaves heads, so its enabled thirds are not q / v: it stays ``qkv``.

Diffusion LoRAs without ``adapter_config.json`` (kohya ``lora_unet_*`` / ``lora_te_*`` files, diffusers
``pytorch_lora_weights.safetensors``) are detected by their key names in a folder, a zip, a single
``.safetensors`` path, bytes or an upload, and read by :mod:`geometry.io.diffusion`.

Everything else in the weights file (``classifier.*``, ``score.weight``, ``modules_to_save`` copies,
``lora_B.bias``) is kept in ``Adapter.other_tensors``.

Every input is untrusted (an upload to a shared page): whatever is wrong, the loader raises
:class:`~geometry.errors.AdapterLoadError` with one sentence naming the file, the member, tensor or
field, and what was expected; it never runs code from a file (``.bin`` pickles go through
``torch.load(weights_only=True)``, which refuses any global that is not a tensor type) and never
inflates more than the limits of :mod:`geometry.io.limits`:

* zips: the archive size (``max_upload_bytes``), the member count and the size of the zip directory
  are checked before it is parsed; members with absolute paths, ``..``, symbolic links, duplicate
  names, encryption or an unknown compression method are refused; the declared uncompressed total
  (``max_zip_bytes``) and every member's compression ratio (``max_ratio``, members over 1 MiB) are
  checked before anything is inflated, and reading stops at the budget in 1 MiB chunks whatever the
  headers claim (a header that lies about a size ends in a CRC error: "corrupted (bad CRC)").
  Zips inside the zip are never unpacked: they are ignored, and named in the error when the
  adapter seems to be inside one.
* ``.bin``: a torch zip archive gets the same size / ratio checks before ``torch.load``.
* weights: LoRA factors must be dense floating-point 2-D tensors with positive sizes and chained
  ranks; every floating tensor must be finite.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from geometry.errors import AdapterLoadError
from geometry.io import diffusion, hub
from geometry.io.factors import (  # noqa: F401  (the file names and key patterns, read here by their users)
    CONFIG_NAME,
    EMBED_RE,
    FACTOR_RE,
    MAGNITUDE_RE,
    MAX_CONFIG_BYTES,
    WEIGHT_NAMES,
    build_adapter,
    fill_modules,
)
from geometry.io.limits import limits as current_limits
from geometry.io.zipsafe import _ZIP_ERRORS, _check_zip_member, _detail, _read_member, _zip_directory
from geometry.types import Adapter

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def load_adapter(
    source: Any,
    name: str | None = None,
    *,
    max_bytes: int | None = None,
    max_members: int | None = None,
    max_ratio: float | None = None,
    max_upload_bytes: int | None = None,
) -> Adapter:
    """Load one adapter from any supported source.

    ``source``: a folder path, a ``.zip`` path, zip ``bytes``, a ``{filename: bytes}`` dict
    (config + weights), ``"hub:<repo_id>"``, or a string that is not an existing path and looks
    like ``owner/name`` (downloaded with ``huggingface_hub.snapshot_download``). The limits
    (see :func:`load_zip_bytes`) default to :func:`geometry.io.limits.limits`; they apply to zips
    (bytes or a path) and to ``{filename: bytes}`` uploads, not to folders.
    """
    zip_limits = dict(max_bytes=max_bytes, max_members=max_members, max_ratio=max_ratio,
                      max_upload_bytes=max_upload_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data.startswith(b"PK") and diffusion.safetensors_keys(data) is not None:  # a kohya / diffusers file
            return load_weights_bytes(data, name=name or "adapter", max_upload_bytes=max_upload_bytes)
        return load_zip_bytes(data, name=name, **zip_limits)
    if isinstance(source, dict):
        return load_files(source, name=name, max_upload_bytes=max_upload_bytes)
    if not isinstance(source, (str, Path)):
        raise AdapterLoadError(f"cannot load an adapter from a {type(source).__name__}")
    text = str(source)
    if text.startswith("hub:"):
        return load_hub(text[4:], name=name)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_folder(path, name=name)
    if path.is_file():
        if zipfile.is_zipfile(path):
            cap = current_limits().max_upload_bytes if max_upload_bytes is None else max_upload_bytes
            size = path.stat().st_size
            if size > cap:
                raise AdapterLoadError(f"{path}: zip archive is {size} bytes, more than the limit of {cap} bytes")
            return load_zip_bytes(_read_file(path), name=name or path.stem, source=str(path), **zip_limits)
        if path.name == CONFIG_NAME or (path.name in WEIGHT_NAMES and (path.parent / CONFIG_NAME).is_file()):
            return load_folder(path.parent, name=name)
        if path.suffix.lower() == ".safetensors":  # a kohya / diffusers LoRA file
            return load_weights_bytes(_read_file(path), name=name or path.stem, source=str(path),
                                      max_upload_bytes=max_upload_bytes)
        raise AdapterLoadError(f"{path}: not a folder, a .zip, {CONFIG_NAME} or one of {', '.join(WEIGHT_NAMES)}")
    if isinstance(source, str) and _HUB_ID_RE.match(text) and not Path(text.split("/")[0]).exists():
        try:
            return load_hub(text, name=name)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"{text}: no such file or folder, and as a hub id: {exc}") from exc
    raise AdapterLoadError(f"{text}: no such file or folder")


def _find_adapter_dir(root: Path) -> Path:
    if (root / CONFIG_NAME).is_file():
        return root
    found = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob(CONFIG_NAME) if p.is_file())
    if not found:
        raise AdapterLoadError(f"{root}: no {CONFIG_NAME} in this folder or its subfolders, and no kohya / "
                               "diffusers .safetensors LoRA file")
    return root / PurePosixPath(_shallowest(found, str(root), "folder")[0]).parent


def _shallowest(configs: list[str], where: str, what: str) -> list[str]:
    """The one least nested config path (a training output with ``checkpoint-N/`` copies below it)."""
    depth = min(len(PurePosixPath(c).parts) for c in configs)
    top = [c for c in configs if len(PurePosixPath(c).parts) == depth]
    if len(top) > 1:
        raise AdapterLoadError(
            f"{where}: several {CONFIG_NAME} at the same level of this {what} ({', '.join(map(repr, top[:5]))}); "
            "give one adapter")
    return top


def load_folder(path: str | Path, name: str | None = None) -> Adapter:
    """Load the adapter in ``path`` (or in its single subfolder holding ``adapter_config.json``)."""
    root = Path(path)
    if root.is_dir() and not any(root.rglob(CONFIG_NAME)):  # a kohya / diffusers folder (no config)
        names = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors") if p.is_file()]
        wname = diffusion.pick_weights(names, str(root))
        if wname is not None:
            return load_weights_bytes(_read_file(root / wname), name=name or root.resolve().name,
                                      source=str(root / wname))
    folder = _find_adapter_dir(root)
    cfg = folder / CONFIG_NAME
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{cfg}: {cfg.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} bytes a LoRA config can need")
    files = {CONFIG_NAME: _read_file(cfg)}
    for wname in WEIGHT_NAMES:
        if (folder / wname).is_file():
            files[wname] = _read_file(folder / wname)
            break
    else:
        raise AdapterLoadError(f"{folder}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    return build_adapter(files, name=name or folder.resolve().name, source=str(folder))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterLoadError(f"{path}: cannot read the file ({type(exc).__name__}: {exc.strerror or exc})") from exc




def load_zip_bytes(
    data: bytes,
    name: str | None = None,
    *,
    source: str = "<zip>",
    max_bytes: int | None = None,
    max_members: int | None = None,
    max_ratio: float | None = None,
    max_upload_bytes: int | None = None,
) -> Adapter:
    """Load the adapter in a zip archive given as bytes (an upload or a file's content).

    The adapter folder is the one directory of the archive holding ``adapter_config.json`` (top
    level or a subfolder). Refused: archives over ``max_upload_bytes``, with more than
    ``max_members`` members or more than ``max_bytes`` uncompressed bytes in all, members with
    absolute paths, ``..``, symbolic links, duplicate names or encryption, and members over 1 MiB
    whose compression ratio exceeds ``max_ratio`` (checked before anything is inflated). Zips inside
    the archive are ignored, never unpacked. Each limit left ``None`` comes from
    :func:`geometry.io.limits.limits` (``ADAPTER_ATLAS_DEMO`` selects the demo ones).
    """
    lim = current_limits()
    max_bytes = lim.max_zip_bytes if max_bytes is None else max_bytes
    max_members = lim.max_zip_members if max_members is None else max_members
    max_ratio = lim.max_ratio if max_ratio is None else max_ratio
    max_upload_bytes = lim.max_upload_bytes if max_upload_bytes is None else max_upload_bytes
    if len(data) > max_upload_bytes:
        raise AdapterLoadError(f"{source}: zip archive is {len(data)} bytes, more than the limit of {max_upload_bytes}")
    _zip_directory(data, source, max_members)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as exc:
        raise AdapterLoadError(f"{source}: not a readable zip archive ({_detail(exc)})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise AdapterLoadError(f"{source}: zip has {len(infos)} members, more than the limit of {max_members}")
        total = 0
        seen: set[str] = set()
        for info in infos:
            _check_zip_member(info, source, max_ratio)
            norm = str(PurePosixPath(info.filename.replace("\\", "/")))
            if norm in seen and not info.is_dir():
                raise AdapterLoadError(f"{source}: zip has two members named {info.filename!r}; which one is meant?")
            seen.add(norm)
            total += info.file_size
        if total > max_bytes:
            raise AdapterLoadError(f"{source}: zip uncompressed size {total} bytes exceeds the limit of {max_bytes}")
        files = {
            i.filename: i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")
        }
        configs = sorted(f for f in files if PurePosixPath(f).name == CONFIG_NAME)
        weights_only = None if configs else diffusion.pick_weights(list(files), source)
        if weights_only is not None:  # a kohya / diffusers LoRA: no config
            data = _read_member(zf, files[weights_only], max_bytes, source)
            stem = PurePosixPath(weights_only).parent.name or (Path(source).stem if source != "<zip>" else "adapter")
            return diffusion.build_diffusion_adapter(data, name=name or stem, source=source,
                                                     label=f"{source}/{weights_only}")
        if not configs:
            inner = sorted(f for f in files if f.lower().endswith(".zip"))
            if inner:
                raise AdapterLoadError(
                    f"{source}: no {CONFIG_NAME} in the zip archive, only another zip ({inner[0]!r}), and zips "
                    "inside a zip are not unpacked; upload that inner zip itself")
            raise AdapterLoadError(f"{source}: no {CONFIG_NAME} in the zip archive")
        configs = _shallowest(configs, source, "zip")
        folder = PurePosixPath(configs[0]).parent
        wanted = {CONFIG_NAME: configs[0]}
        for wname in WEIGHT_NAMES:
            member = str(folder / wname) if str(folder) != "." else wname
            if member in files:
                wanted[wname] = member
                break
        else:
            raise AdapterLoadError(f"{source}: no {' or '.join(WEIGHT_NAMES)} next to {configs[0]!r} in the zip")
        budget = max_bytes
        contents = {}
        for short, member in wanted.items():
            cap = min(budget, MAX_CONFIG_BYTES) if short == CONFIG_NAME else budget
            contents[short] = _read_member(zf, files[member], cap, source)
            budget -= len(contents[short])
    default = folder.name if str(folder) != "." else (Path(source).stem if source != "<zip>" else "adapter")
    return build_adapter(contents, name=name or default, source=source)


def load_files(files: dict[str, bytes], name: str | None = None, *, max_upload_bytes: int | None = None) -> Adapter:
    """Load from a ``{filename: bytes}`` pair: a ``*.json`` config and a ``.safetensors`` / ``.bin`` weights file.

    Each file may have at most ``max_upload_bytes`` (default :func:`geometry.io.limits.limits`).
    """
    cap = current_limits().max_upload_bytes if max_upload_bytes is None else max_upload_bytes
    for key, data in files.items():
        if not isinstance(key, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise AdapterLoadError(f"{key!r}: expected file names mapped to their bytes, got a {type(data).__name__}")
        if len(data) > cap:
            raise AdapterLoadError(f"{key}: {len(data)} bytes, more than the upload limit of {cap} bytes")
    configs = [k for k in files if k.lower().endswith(".json")]
    weights = [k for k in files if k.lower().endswith((".safetensors", ".bin"))]
    if not configs and len(weights) == 1 and weights[0].lower().endswith(".safetensors"):  # kohya / diffusers
        return diffusion.build_diffusion_adapter(bytes(files[weights[0]]), name=name or Path(weights[0]).stem,
                                                 source=weights[0], label=weights[0])
    if len(configs) != 1 or len(weights) != 1:
        raise AdapterLoadError(
            f"expected one config (.json) and one weights file (.safetensors or .bin), got {sorted(files)}"
        )
    wkey = weights[0]
    wname = WEIGHT_NAMES[0] if wkey.lower().endswith(".safetensors") else WEIGHT_NAMES[1]
    contents = {CONFIG_NAME: bytes(files[configs[0]]), wname: bytes(files[wkey])}
    return build_adapter(contents, name=name or "adapter", source=f"{configs[0]} + {wkey}", file_labels={
        CONFIG_NAME: configs[0], wname: wkey})


def load_weights_bytes(data: bytes, name: str = "adapter", *, source: str = "<upload>",
                       max_upload_bytes: int | None = None) -> Adapter:
    """Load a kohya / diffusers LoRA ``.safetensors`` file given as bytes (no ``adapter_config.json``;
    see :mod:`geometry.io.diffusion`). At most ``max_upload_bytes`` (default :func:`geometry.io.limits.limits`)."""
    cap = current_limits().max_upload_bytes if max_upload_bytes is None else max_upload_bytes
    if len(data) > cap:
        raise AdapterLoadError(f"{source}: {len(data)} bytes, more than the upload limit of {cap} bytes")
    return diffusion.build_diffusion_adapter(data, name=name, source=source, label=source)


def load_hub(repo_id: str, revision: str | None = None, name: str | None = None,
             max_bytes: int | None = None) -> Adapter:
    """Download the adapter files of ``repo_id`` (:func:`geometry.io.hub.download`) and load them.

    ``max_bytes``: refuse, before downloading anything, a repository whose adapter files are larger (their
    sizes come from the hub's file metadata). Default: the upload limit in demo mode
    (:mod:`geometry.io.limits`), no cap otherwise.
    """
    folder = hub.download(repo_id, revision, max_bytes)
    adapter = load_folder(folder, name=name or repo_id)
    adapter.source = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    return adapter
