"""``load_interventions`` from the Hugging Face Hub: a repository id (``"owner/name"``) that is not
a local folder is resolved through ``huggingface_hub`` (its cache, its offline mode and token
settings apply) to a local snapshot holding the intervention files."""
from __future__ import annotations

import os
import re

# the Hub's repository ids "owner/name" (letters, digits, "-", "_", "."); a bare "name" is taken
# as a local path
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_repo_id(value) -> bool:
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value


def resolve_folder(directory, files, revision=None):
    """A local folder holding ``files``: ``directory`` itself when it is a folder (or not a repository
    id: the caller's checks then name what is missing), else the Hub snapshot of that repository
    id at ``revision``. ValueError when the repository cannot be resolved."""
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be None or a string, got {type(revision).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path or a Hub repository id, got {type(directory).__name__}")
    if os.path.isdir(directory) or not looks_like_repo_id(directory):
        if revision is not None:
            raise ValueError("revision applies to a Hub repository id, not to the local folder "
                             f"{os.fspath(directory)!r}")
        return os.fspath(directory)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"{directory!r} is not a local folder, and huggingface_hub (needed to read it as a Hub "
                         "repository id) is not installed") from None
    folders = set()
    for name in files:
        try:
            path = hf_hub_download(directory, name, revision=revision)
        except Exception as exc:  # huggingface_hub raises its own error types
            raise ValueError(f"{directory!r} is not a local folder, and as a Hub repository id its {name} could not "
                             f"be fetched: {type(exc).__name__}: {exc}") from None
        folders.add(os.path.dirname(path))
    if len(folders) != 1:
        raise ValueError(f"the Hub repository {directory!r} gave its files from different snapshots: {sorted(folders)}")
    return folders.pop()
