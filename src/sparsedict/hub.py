"""Moving checkpoints to and from the Hugging Face hub (through ``huggingface_hub``); nothing else.

:func:`resolve` turns a local directory or a hub repo id into a local directory (downloaded into the HF
cache, so ``HF_HUB_OFFLINE=1`` and a populated cache work offline); :func:`fetch_uri` does so for one file named
by an ``hf://`` URI (the formats that list files elsewhere on the hub get it passed in); :func:`push_to_hub` saves a dictionary in
our format (:mod:`sparsedict.formats.native`) and uploads it. Reading and writing the files is the formats'
job; loading goes through ``Dictionary.from_pretrained``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from sparsedict.formats import FormatError, detect_format, native


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _not_cached(what: str, err: Exception) -> FileNotFoundError:
    why = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if _offline() else "it is not cached"
    return FileNotFoundError(
        f"cannot load {what}: {why} and the hub could not be reached ({err}). Download it once with network "
        "access, or pass a local directory."
    )


def fetch_uri(uri: str) -> Path:
    """The local copy of one file named ``hf://org/repo/path/in/repo[?revision=rev]`` (the URIs of circuit-tracer's
    ``transcoders`` lists), downloaded into the HF cache (offline: found there)."""
    from urllib.parse import parse_qs, urlparse

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    parsed = urlparse(uri)
    name, _, filename = parsed.path.lstrip("/").partition("/")
    if parsed.scheme != "hf" or not parsed.netloc or not name or not filename:
        raise ValueError(f"{uri!r} is not a hub file URI hf://org/repo/path/in/repo[?revision=rev]")
    repo_id, revision = f"{parsed.netloc}/{name}", parse_qs(parsed.query).get("revision", [None])[0] or None
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError: it is one
        raise _not_cached(f"{uri!r} (revision {revision or 'main'})", err) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise FileNotFoundError(f"no hub file {uri!r}: {err}") from err


def _download(repo_id: str, subfolder: str | None, revision: str | None) -> Path:
    """Snapshot ``repo_id`` (only ``subfolder`` when given) into the HF cache and return the local dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def fetch(patterns: list[str] | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except LocalEntryNotFoundError as err:
            raise _not_cached(f"{repo_id!r} (revision {revision or 'main'})", err) from err
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(f"no hub repo/revision {repo_id!r}@{revision or 'main'}: {err}") from err

    if subfolder:
        sub = subfolder.strip("/")
        return fetch([f"{sub}/*"]) / sub
    # Whole repo: look at the configs first so a multi-dictionary repo (sparsify run) is not downloaded
    # entirely just to be told to choose a subfolder.
    root = fetch(["*.json", "*.md"])
    try:
        if detect_format(root) == "sparsify_run":
            return root
    except FormatError:
        pass
    return fetch(None)


def resolve(
    path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None
) -> Path:
    """The local directory of a checkpoint: ``path_or_repo_id`` itself (``/subfolder``) or its hub download."""
    path = Path(path_or_repo_id)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repos, but {path} is a local directory")
        if subfolder:
            path = path / subfolder
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist: subfolder {subfolder!r} is not in {path_or_repo_id}"
                )
        return path
    if _looks_like_repo_id(str(path_or_repo_id)):
        return _download(str(path_or_repo_id), subfolder, revision)
    raise FileNotFoundError(
        f"no checkpoint at {path}: give a local directory (config.json + model.safetensors, or a SAELens, "
        "sparsify or dictionary_learning directory) or a hub repo id 'org/name'"
    )


def push_to_hub(
    model,
    repo_id: str,
    meta: dict[str, Any] | None = None,
    subfolder: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Save ``model`` (config.json + model.safetensors + README.md) and upload it to hub repo ``repo_id``.

    ``subfolder`` uploads into a folder of the repo (several dictionaries in one repo). Returns the commit
    URL. Needs network access and a token (``HF_TOKEN`` or ``huggingface-cli login``).
    """
    if _offline():
        raise RuntimeError(
            f"push_to_hub({repo_id!r}): HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use "
            "save_pretrained(dir) and upload the directory later"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sparsedict-push-") as tmp:
        folder = native.save(model, Path(tmp) / "dictionary", meta)
        if subfolder is None:
            native.update_meta(folder, repo_id=repo_id)  # the card names the repo
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=subfolder or None,
            commit_message=commit_message or f"Upload {model.architecture} dictionary with sparsedict",
            revision=revision,
        )
    return str(getattr(info, "commit_url", info))
