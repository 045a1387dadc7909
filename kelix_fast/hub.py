"""Checkpoint locations: a local directory or a Hugging Face Hub repo id, resolved to a local directory.

Every ``from_pretrained`` of kelix_fast (``KelixAR``, ``KelixDiT``, ``load_vae``, ``KelixProcessor``,
``KelixPipeline``) goes through :func:`resolve_pretrained`, so a checkpoint is named the same way
everywhere: ``"Kelix-SFT"`` (a directory), ``"OpenOneRec/Kelix-SFT"`` (a repo id), or, as the official
demo writes the DC-AE, ``"Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers/vae"`` (a repo id
followed by a folder inside it). Repos are fetched with ``huggingface_hub.snapshot_download``, which
keeps them in the Hub cache and, offline, finds them there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["resolve_pretrained"]

# The Hub's repo id rule: "name" or "namespace/name", letters, digits and "-_.", no "--" or "..", no
# leading or trailing "-" or ".", at most 96 characters.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}(?:/{_PART})?")
_MAX_REPO_ID = 96
_TRUE = {"1", "on", "yes", "true"}


def resolve_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    arg: str = "name_or_path",
) -> Path:
    """The local directory of a checkpoint named by a path or a Hugging Face repo id.

    Args:
        name_or_path: an existing directory (used as it is), a repo id ``"org/name"`` (downloaded into,
            or found in, the Hub cache), or ``"org/name/sub/folder"``: a repo id with a folder inside
            it (the official demo's form; only that folder is fetched).
        subfolder: a folder inside the directory or repo (e.g. ``"vae"``).
        revision: branch, tag or commit of a repo id (default ``"main"``); not valid with a directory.
        local_files_only: never reach the network, use the cache only. None: True when the environment
            says offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, read at call time, so a process
            that sets it after importing ``huggingface_hub`` is honoured too).
        cache_dir: the Hub cache. None: ``HF_HUB_CACHE`` (read at call time), else huggingface_hub's
            default (``~/.cache/huggingface/hub``).
        arg: the caller's name of ``name_or_path``, for error messages.

    Returns:
        the directory (a snapshot folder of the Hub cache for a repo id).

    Raises:
        TypeError: a non-string argument. ValueError: a malformed subfolder, or ``revision`` with a
        directory. FileNotFoundError: neither an existing directory nor a repo that could be found, or
        no ``subfolder`` in it; the message names ``arg`` and says whether the cache alone was searched.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"{arg} must be a directory or a Hugging Face repo id, got {type(name_or_path).__name__}"
        )
    for name, value in (("subfolder", subfolder), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{arg}: {name} must be a non-empty str or None, got {value!r}")
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in Path(subfolder).parts):
        raise ValueError(f"{arg}: subfolder must be a relative path inside it, got {subfolder!r}")
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        if revision is not None:
            raise ValueError(
                f"{arg}: revision={revision!r} applies to Hugging Face repo ids, but {text!r} is a "
                "local directory"
            )
        return _subdirectory(Path(text), subfolder, arg, text)
    repo_id, inner = _split_repo_id(text)
    if repo_id is None:
        raise FileNotFoundError(
            f"{arg} must be a directory or a Hugging Face repo id ('org/name'), got {text!r}: no such "
            "directory, and not a repo id"
        )
    folder = "/".join(part for part in (inner, subfolder) if part) or None
    offline = _offline() if local_files_only is None else bool(local_files_only)
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
    # Imported here: loading from directories (the common case on a server) never needs it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=None if folder is None else [f"{folder}/*"],
        )
    except (OSError, EntryNotFoundError, HFValidationError) as exc:
        where = "the Hub cache only (offline)" if offline else "the Hub and its cache"
        raise FileNotFoundError(
            f"{arg} must be a directory or a Hugging Face repo id, got {text!r}: no such directory, and "
            f"the repo {repo_id!r} (revision {revision or 'main'!r}) was not found in {where}: {exc}"
        ) from exc
    return _subdirectory(Path(snapshot), folder, arg, text)


def _split_repo_id(text: str) -> tuple[str | None, str | None]:
    """``"org/name[/sub/folder]"`` -> (``"org/name"``, ``"sub/folder"`` or None); (None, None) when
    ``text`` is not a repo id (an absolute or dotted path, a backslash, an invalid name)."""
    parts = text.split("/")
    repo_id = "/".join(parts[:2])
    inner = "/".join(parts[2:]) or None
    valid = (
        len(repo_id) <= _MAX_REPO_ID
        and _REPO_ID.fullmatch(repo_id) is not None
        and "--" not in repo_id
        and ".." not in repo_id
        and (inner is None or all(p and p not in (".", "..") for p in parts[2:]))
    )
    return (repo_id, inner) if valid else (None, None)


def _subdirectory(root: Path, subfolder: str | None, arg: str, given: str) -> Path:
    directory = root if subfolder is None else root / subfolder
    if not directory.is_dir():
        raise FileNotFoundError(f"{arg}: {given!r} has no folder {subfolder!r} (looked in {root})")
    return directory


def _offline() -> bool:
    """Whether the environment asks for offline mode, now or when huggingface_hub was imported."""
    if any(
        os.environ.get(v, "").strip().lower() in _TRUE
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
