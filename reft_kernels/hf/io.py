"""Save and load the attached interventions: ``interventions.safetensors`` (the parameters, and
the state of the ``modules_to_save`` under ``modules_to_save.<module>.<tensor>``) and
``reft_config.json`` (the configs, ``modules_to_save``, the model type, hidden size and layer
count, the library version, and the weights file's SHA-256).

A save replaces the pair as one: the config is the commit point. The new weights go first to
``interventions.safetensors.pending``, then the new config replaces the old one, then the pending
weights replace the old weights; every file is written under a temporary name (``.reft-tmp-*``),
flushed to disk and renamed into place, so no file is ever half-written under its real name. A
reader takes the weights file whose checksum the config names (the real one, else the pending
one), so the folder holds one complete save at every instant: the previous one until the new
config is in place, the new one from then on. A save killed part-way leaves temporaries and
perhaps a pending file; the next save first finishes (pending weights the config names) or
removes (any other pending file, every ``.reft-tmp-*``) what it left. After the pair, the model
card's section of ``README.md`` is written (``model_card.py``; loading never reads it); other
files in the folder are never touched. One writer per folder at a time.

``load_interventions`` reads and checks everything (JSON, checksum, tensor names, shapes, finite
values) before it changes anything: a corrupted, truncated or mismatched file raises ValueError
and leaves the model exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from .adapters import DEFAULT_ADAPTER, check_adapter_name
from .attach import get_handle, get_reft_model
from .config import config_from_dict
from .extras import PREFIX as EXTRAS_PREFIX
from .extras import check_modules_to_save, extras_state
from .hub import resolve_folder
from .model_card import write_card
from .sharding import is_sharded as _is_sharded

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "interventions.safetensors"
PENDING_NAME = WEIGHTS_NAME + ".pending"
TMP_PREFIX = ".reft-tmp-"
FORMAT_VERSION = 1


def _fsync_dir(folder: str) -> None:
    """Make the renames in ``folder`` durable (where the OS lets a directory be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask): ``mkstemp`` makes 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, rename it to ``path``
    (with the permissions of a file written with ``open()``)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if hasattr(os, "fchmod"):
                os.fchmod(fd, _file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _sha256_of(path: str):
    """The file's SHA-256 (hex) and bytes, or (None, None) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None, None
    return hashlib.sha256(blob).hexdigest(), blob


def _committed_sha(directory: str):
    """The weights checksum that the folder's config names (None without a readable config)."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), "rb") as f:
            meta = json.loads(f.read().decode())
        return meta.get("weights_sha256") if isinstance(meta, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _settle(directory: str) -> None:
    """Finish or undo what a killed save left in ``directory``: pending weights that the config
    names are renamed into place (that save had committed), any other pending file is removed
    (it had not), and so is every temporary file of ours. The folder's complete save, whichever
    it is, stays readable throughout."""
    pending = os.path.join(directory, PENDING_NAME)
    if os.path.exists(pending):
        sha, _ = _sha256_of(pending)
        if sha is not None and sha == _committed_sha(directory):
            os.replace(pending, os.path.join(directory, WEIGHTS_NAME))
            _fsync_dir(directory)
        else:
            os.unlink(pending)
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _describe_model(handle, ad) -> dict:
    """What a save records of the model for adapter ``ad`` (an ``attach._Adapter``)."""
    return {"model_type": handle.model_type, "hidden_size": ad.hidden_size,
            "num_layers": ad.num_layers,
            "sites": [[key for key, _, _ in sites] for sites in ad.sites]}


def sharded(model) -> bool:
    """Whether the interventions of ``model`` are sharded DTensors (FSDP2): saving them is then a
    collective that every rank must join."""
    return any(_is_sharded(p) for p in get_handle(model).interventions.parameters())


def _adapter_state(handle, ad) -> dict:
    """The tensors a save of adapter ``ad`` holds: its interventions' state dict and that of the
    ``modules_to_save``."""
    return {**ad.groups.state_dict(), **extras_state(handle.extra_modules)}


def save_interventions(model, directory, *, adapter_name=None) -> None:
    """Write the interventions of ``model`` (see ``get_reft_model``) to ``directory`` (created if
    needed): the parameters as safetensors (on the CPU, each in its own dtype; the
    ``modules_to_save`` beside them) and the JSON config. ``adapter_name``: which named adapter
    (None: the active one; see ``adapters.py``). Over an earlier save the pair is
    replaced as one (see the module docstring): an interruption at any point leaves the earlier
    save or the new one readable, never a mix, and the next save removes what an interrupted one
    left.

    Under FSDP2 (``fully_shard``: the parameters are DTensors sharded over the ranks) every rank
    must call it: the shards are gathered (a collective) and rank 0 alone writes. Under DDP the
    parameters are whole on every rank: call it on one rank (rank 0).
    """
    from safetensors.torch import save as st_save

    from .. import __version__

    handle = get_handle(model)
    ad = handle._adapter(adapter_name)
    state = _adapter_state(handle, ad)
    gathered = any(_is_sharded(v) for v in state.values())
    state = {k: v.full_tensor() if _is_sharded(v) else v for k, v in state.items()}  # collective
    if gathered and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    # cloned: tied weights among the modules_to_save would otherwise share storage (safetensors refuses)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    blob = st_save(tensors, metadata={"format": "pt"})
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "reft_kernels",
        "library_version": __version__,
        "configs": [c.to_dict() for c in ad.configs],
        "modules_to_save": list(handle.modules_to_save),
        **_describe_model(handle, ad),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    directory = os.fspath(directory)
    _settle(directory)
    pending = os.path.join(directory, PENDING_NAME)
    _atomic_write(pending, blob)
    _atomic_write(os.path.join(directory, CONFIG_NAME), json.dumps(meta, indent=2).encode())  # the commit
    os.replace(pending, os.path.join(directory, WEIGHTS_NAME))
    write_card(model, _CardView(handle, ad), directory, __version__, _atomic_write)  # for people and the Hub; never read back
    _fsync_dir(directory)


class _CardView:
    """What the model card reads of a handle, for one adapter."""

    def __init__(self, handle, ad):
        self.model_type, self.modules_to_save = handle.model_type, handle.modules_to_save
        self.configs, self.sites, self.hidden_size = ad.configs, ad.sites, ad.hidden_size


def read_interventions(directory):
    """(metadata dict, configs, {name: CPU tensor}) read from ``directory`` and checked against its
    own checksum; ValueError for anything missing, corrupted or truncated. The weights are those
    of ``interventions.safetensors``, or, after a save interrupted between its commit and its
    last rename, of the pending file that the config names."""
    from safetensors.torch import load as st_load

    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    ppath = os.path.join(directory, PENDING_NAME)
    if not os.path.isfile(cpath):
        raise ValueError(f"no saved interventions at {directory!r}: {CONFIG_NAME} is missing")
    if not os.path.isfile(wpath) and not os.path.isfile(ppath):
        raise ValueError(f"no saved interventions at {directory!r}: {WEIGHTS_NAME} is missing")
    try:
        with open(cpath, "rb") as f:
            meta = json.loads(f.read().decode())
        if not isinstance(meta, dict) or meta.get("library") != "reft_kernels":
            raise ValueError("not a reft_kernels intervention config")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {meta.get('format_version')!r}, this library reads {FORMAT_VERSION}")
        configs = tuple(config_from_dict(c) for c in meta["configs"])
        check_modules_to_save(meta.get("modules_to_save") or None)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cpath} is not a valid intervention config: {exc}") from None
    blob = None
    for path in (wpath, ppath):
        sha, data = _sha256_of(path)
        if sha is not None and sha == meta.get("weights_sha256"):
            blob = data
            break
    if blob is None:
        raise ValueError(f"{wpath} does not match the checksum in {CONFIG_NAME}: the file is corrupted, "
                         "truncated, or from another save")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{wpath} is not a readable safetensors file: {exc}") from None
    return meta, configs, tensors


def load_interventions(model, directory, *, allow_nonfinite: bool = False, revision=None, adapter_name=None):
    """Load interventions saved by ``save_interventions`` into ``model`` and return it.

    ``adapter_name`` (see ``adapters.py``): None loads into the active adapter (or attaches
    ``"default"``); an existing name loads into that adapter; a new name on a model that has
    interventions adds the saved configs as that adapter, inactive (PEFT's ``load_adapter``:
    ``model.reft.set_adapter(name)`` activates it), and deletes it again on any error.

    ``directory``: the saved folder, or a Hugging Face Hub repository id (``"owner/name"``, when
    no such local folder exists) resolved through ``huggingface_hub`` at ``revision`` (a branch,
    tag or commit; None for the default branch), its cache and offline mode included.

    If ``model`` has no interventions yet, they are attached first from the saved configs and
    ``modules_to_save`` (as ``get_reft_model`` does, quietly). If it has, its configs and
    ``modules_to_save`` must equal the saved ones. The saved state of the ``modules_to_save`` is
    written into those modules. The saved model type, hidden size and layer count must match the
    model. Every check runs before any parameter is written; on error the model is left exactly
    as it was (an attach made here is undone). A saved tensor holding NaN or Inf raises
    ValueError naming it, unless ``allow_nonfinite=True``.
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
    directory = resolve_folder(directory, (CONFIG_NAME, WEIGHTS_NAME), revision)
    meta, configs, tensors = read_interventions(directory)
    saved_extras = tuple(meta.get("modules_to_save") or ())
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    attached_here = getattr(model, "reft", None) is None
    added_here = None
    if attached_here:
        get_reft_model(model, list(configs), verbose=False, modules_to_save=list(saved_extras) or None,
                       adapter_name=adapter_name or DEFAULT_ADAPTER)
    elif adapter_name is not None and adapter_name not in get_handle(model).adapter_names:
        get_handle(model).add_adapter(adapter_name, list(configs))
        added_here = adapter_name
    try:
        handle = get_handle(model)
        if handle._red_merged is not None:
            raise ValueError("RED is merged into this model's weights: call unmerge_red(model) before "
                             "load_interventions")
        ad = handle._adapter(adapter_name)
        if tuple(c.to_dict() for c in ad.configs) != tuple(c.to_dict() for c in configs):
            raise ValueError(f"the interventions saved in {directory!r} have other configs than the model's "
                             f"adapter {ad.name!r}: saved {[c.to_dict() for c in configs]}, attached "
                             f"{[c.to_dict() for c in ad.configs]}")
        if tuple(handle.modules_to_save) != saved_extras:
            raise ValueError(f"the interventions saved in {directory!r} have modules_to_save={list(saved_extras)}, "
                             f"the model's are {list(handle.modules_to_save)}")
        mine = _describe_model(handle, ad)
        for key, value in mine.items():
            saved = meta.get(key)
            if isinstance(value, tuple):
                value = list(value)
            if saved != value:
                raise ValueError(f"the interventions in {directory!r} were saved for {key} = {saved!r}; "
                                 f"this model has {value!r}")
        state = _adapter_state(handle, ad)
        if set(state) != set(tensors):
            missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
            raise ValueError(f"{WEIGHTS_NAME} in {directory!r} does not hold this model's interventions: "
                             f"missing {missing}, unexpected {extra}")
        for name, dst in state.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: saved shape {tuple(src.shape)}, the model's is {tuple(dst.shape)}")
            if src.is_floating_point() != dst.is_floating_point():
                raise ValueError(f"{name}: saved dtype {src.dtype}, the model's is {dst.dtype}")
            if not src.is_floating_point():
                if name.startswith(EXTRAS_PREFIX):
                    continue  # an integer buffer of a module to save
                raise ValueError(f"{name}: saved dtype {src.dtype} is not floating point")
            if not allow_nonfinite:
                bad = int((~torch.isfinite(src)).sum())
                if bad:
                    raise ValueError(f"{name}: the tensor saved in {directory!r} holds {bad} NaN or Inf "
                                     f"value(s) of {src.numel()}; pass allow_nonfinite=True to load it anyway")
    except BaseException:
        if attached_here:
            get_handle(model).remove()
        elif added_here is not None:
            get_handle(model).delete_adapter(added_here)
        raise
    with torch.no_grad():
        for name, dst in state.items():
            src = tensors[name].to(device=dst.device, dtype=dst.dtype)
            if _is_sharded(dst):  # FSDP2: each rank keeps its own shard of the saved tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src, dst.device_mesh, dst.placements)
            dst.copy_(src)
    return model
