"""Kernel launches of a training step, counted exactly on any device (a CPU included).

On a GPU every ATen call that computes something is at least one kernel launch of a few
microseconds, and so is every Triton kernel call; at pyreft's f7+l7 positions the edit itself
moves a few microseconds of memory, so the number of launches per layer is what the step's fixed
cost will be. This module counts them without a GPU:

- ``LaunchCounter``, a ``TorchDispatchMode``, counts the ATen calls that reach a kernel: views
  (``OpOverload.is_view``), allocations without a fill (``empty``, ``empty_strided``, ...), and
  metadata calls (``detach``, ``alias``, ``lift_fresh``, sizes) are left out; ``_local_scalar_dense``
  (``.item()``, a host synchronisation) is counted apart as a sync. Triton kernel calls (compiled,
  or through the CPU interpreter) are counted too, with the ATen calls made inside a Triton launch
  (the interpreter's own copies) left out.
- ``step_launches`` counts one training step (forward with labels and backward; no optimizer) of
  a tiny patched LLaMA; ``per_layer`` takes the marginal cost of one more layer, minus what a
  frozen layer's own forward and backward cost, and the per-step remainder.

The counts are exact and deterministic (no timing), so tests can hold them to a budget.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen calls that allocate without writing, or only read or change metadata: no kernel
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type", "resize_", "set_", "_unsafe_view", "_reshape_alias",
    "record_stream",
    # a Python number wrapped as a 0-dim tensor (``torch.where(c, x, 0)``): on a GPU a kernel
    # argument, not a launch
    "scalar_tensor",
}
_SYNC = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose"}


def _name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class LaunchCounter(TorchDispatchMode):
    """Counts kernel-launching ATen calls (``aten``), Triton kernel calls (``triton``) and host
    synchronisations (``syncs``) while active; ``by_name`` holds each name's count."""

    def __init__(self):
        super().__init__()
        self.aten = self.triton = self.syncs = 0
        self.by_name = collections.Counter()
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        name = _name(func)
        if name in _SYNC:
            self.syncs += 1
            self.by_name["sync:" + name] += 1
        elif not getattr(func, "is_view", False) and name not in _NO_KERNEL:
            self.aten += 1
            self.by_name[name] += 1
        return out

    def count_triton(self, kernel_name: str) -> None:
        self.triton += 1
        self.by_name["triton:" + kernel_name] += 1

    @property
    def total(self) -> int:
        return self.aten + self.triton


@contextlib.contextmanager
def counting():
    """``with counting() as c:`` counts everything run inside (see ``LaunchCounter``)."""
    counter = LaunchCounter()
    with _triton_hook(counter), counter:
        yield counter


@contextlib.contextmanager
def _triton_hook(counter: LaunchCounter):
    """Count each Triton kernel call into ``counter`` (and pause its ATen count inside)."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    saved = [(cls, cls.run) for cls in classes]

    def wrap(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            fn = getattr(self, "fn", self)
            counter.count_triton(getattr(fn, "__name__", "kernel"))
            counter._paused += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter._paused -= 1
        return run

    for cls, original in saved:
        cls.run = wrap(original)
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


def tiny_llama(n_layers: int, d: int = 64, seed: int = 0):
    """A tiny random LLaMA (train mode, no KV cache) for counting."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model.train()


def _inputs(bsz: int, seq: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (bsz, seq), generator=gen)
    labels = ids.masked_fill(torch.arange(seq) < seq // 2, -100)  # the first half is the prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_launches(model, inputs: dict) -> LaunchCounter:
    """The launches of one step: forward with labels, backward (after one untimed warm-up step,
    so that one-time work such as lazy initialisation is not counted)."""
    for counted in (False, True):
        ctx = counting() if counted else contextlib.nullcontext()
        with ctx as c:
            model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    return c


def _frozen(model):
    """The e2e benchmark's frozen step: no adapter, backward down to layer 0's output."""
    for p in model.parameters():
        p.requires_grad_(False)

    def hook(module, args, output):
        (output if isinstance(output, torch.Tensor) else output[0]).requires_grad_(True)

    model.get_decoder().layers[0].register_forward_hook(hook)
    return model


def per_layer(config, *, n_layers: int = 2, bsz: int = 2, seq: int = 32, backend: str | None = None) -> dict:
    """Launch counts of ``config`` (a REDConfig / ReftConfig on every layer, ``layers="all"``) in
    one training step of a tiny LLaMA: ``{"per_layer": {...}, "per_step": {...}}``, each with
    ``aten``, ``triton``, ``total`` and ``syncs``. ``per_layer``: (patched at L+1 layers - at L)
    - (frozen at L+1 - at L); ``per_step``: patched - frozen at L, less L per-layer costs.
    ``backend`` replaces the config's own (None: the config's)."""
    from ..hf import get_reft_model

    if backend is not None:
        config = dataclasses.replace(config, backend=backend)
    inputs = _inputs(bsz, seq)
    counts = {}
    for L in (n_layers, n_layers + 1):
        counts[("frozen", L)] = step_launches(_frozen(tiny_llama(L)), inputs)
        model = tiny_llama(L)
        get_reft_model(model, config, verbose=False)
        counts[("patched", L)] = step_launches(model, inputs)

    def count(kind, L, k):
        return getattr(counts[(kind, L)], k)

    kinds = ("aten", "triton", "syncs")
    layer = {k: (count("patched", n_layers + 1, k) - count("patched", n_layers, k))
             - (count("frozen", n_layers + 1, k) - count("frozen", n_layers, k)) for k in kinds}
    step = {k: count("patched", n_layers, k) - count("frozen", n_layers, k) - n_layers * layer[k] for k in kinds}
    for d_ in (layer, step):
        d_["total"] = d_["aten"] + d_["triton"]
    p1, p0 = counts[("patched", n_layers + 1)].by_name, counts[("patched", n_layers)].by_name
    f1, f0 = counts[("frozen", n_layers + 1)].by_name, counts[("frozen", n_layers)].by_name
    names = {k: p1[k] - p0[k] - f1[k] + f0[k] for k in set(p1) | set(p0) | set(f1) | set(f0)}
    return {"per_layer": layer, "per_step": step,
            "layer_names": dict(sorted(((k, v) for k, v in names.items() if v), key=lambda kv: -kv[1]))}
