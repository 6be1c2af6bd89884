"""``get_reft_model``: attach RED and ReFT interventions to a built ``transformers`` model in place.

What attaching does to the model (and ``model.reft.remove()`` undoes, exactly):
- every base parameter is frozen (each one's ``requires_grad`` is remembered), unless
  ``disable_model_grads=False`` (adapters such as PEFT's LoRA then keep training);
- the interventions become the submodule ``model.reft_interventions`` (a ModuleList with one
  ModuleDict per config, keyed by site: ``layer3``, ``layer3_first`` / ``layer3_last``,
  T5's ``encoder3`` / ``decoder3``), so ``parameters()``, optimizers, DDP/FSDP and the Trainer
  see them; R stays fp32 when the model is cast to bf16 or fp16;
- forward hooks, registered before any other hook (``prepend=True``, so ``output_hidden_states``
  records the edited states): RED on each MLP output projection (every token); ReFT on each
  chosen layer, editing the rows listed by the batch's ``reft_batch`` keyword (see ``batch.py``)
  in place with the fused indexed op, no host synchronisation and no loop over the batch;
- the instance attribute ``model.forward``: the class's forward with the keyword-only
  ``intervention_locations`` and ``adapter_names`` added to its signature (the Trainer keeps a
  dataset column of the first name, and ``generate`` passes both to every step, expanded for
  beam search). It builds the batch's rows once and passes them down as ``reft_batch``;
  ``adapter_names`` gives each example its own adapter (see ``mixed_batch.py``);
- the instance attribute ``model.generate`` (where the model has one): notes the prompt's width
  for the call, so that a generation without a KV cache edits the same prompt rows as one with it;
- the instance attribute ``model.save_pretrained`` (where the model has one): writes the adapter
  (interventions, ``modules_to_save``, configs), not the base weights; see ``checkpoint.py``;
- ``modules_to_save``: the named base modules train (``requires_grad``) and a CPU copy of their
  state is kept for ``remove()``; see ``extras.py``;
- on a ``peft.PeftModel``: its ``disable_adapter()`` disables the interventions too, and its
  ``merge_and_unload()`` / ``unload()`` carry them to the model they return; see ``peft_interplay.py``;
- the attribute ``model.reft``, a ``ReftHandle``: ``disabled()``, ``remove()``,
  ``merge_and_unload()``, ``print_trainable_parameters()``, ``configs``, ``interventions``,
  ``modules_to_save``, and named adapters (``add_adapter``, ``set_adapter``, ``delete_adapter``,
  ``active_adapter``, ``adapter_names``; the inactive ones' modules in ``model.reft_adapters``):
  see ``adapters.py``. ``configs``, ``sites`` and ``interventions`` are the active adapter's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types

import torch
from torch import nn
from torch.nn import functional as F

from .._rows import as_2d_plus, put_rows, row_selector
from .._validate import remember_index_checked
from ..modules import RED
from . import extras
from .adapters import ADAPTERS_ATTR, DEFAULT_ADAPTER, AdapterMethods, check_adapter_name
from .batch import KWARG, build_batch, cache_length
from .component_hooks import ReftInputHook, RowsRelay
from .config import REDConfig, ReftConfig, as_configs
from .flag_watch import FlagWatch
from .mixed_batch import adapter_ids, mixed_adapters
from .positions import prompt_lengths_from_labels
from .shared_rotation import share_rotations
from .seq2seq import EncoderPreHook, decoder_prompt_width, seq2seq_batch, stack_of
from .sites import (RED_SITES, REFT_COMPONENT_SITES, SUBLAYER_COMPONENTS, find_sites, hidden_size, model_type,
                    param_dtype_device, red_width)

HANDLE_ATTR = "reft"
MODULE_ATTR = "reft_interventions"

UNKNOWN_PROMPT = (
    "ReFT positions: a batch came with labels but without intervention_locations, and in some example the "
    "first real token already has a label (no -100 marks a prompt), so its prompt cannot be told from the "
    "labels: its whole sequence counts as the prompt. Pass intervention_locations (ReftDataCollator builds "
    "them) or labels with -100 on the prompt tokens")


def _split_output(output):
    """(hidden states, rebuild) for a tensor or a tuple whose first item is the hidden states."""
    if isinstance(output, torch.Tensor):
        return output, lambda h: h
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda h: (h,) + tuple(output[1:])
    raise TypeError(f"an edited module must return a tensor or a tuple starting with one, got {type(output).__name__}")


def _edit_rows(iv, h, index, dropout: float, training: bool, copy: bool = False):
    """Apply intervention ``iv`` to the rows ``index`` of ``h`` (B, S, d); returns the result.

    Without dropout it edits ``h`` in place (the layer output is a fresh tensor that nothing else
    holds yet), which saves a (B, S, d) copy per layer; when autograd forbids that (``h`` a leaf
    that requires grad, or a view, or ``copy``: a layer's input, which others may hold) it edits
    a copy. With dropout in training, pyreft's
    ``dropout(h + edit)`` on the edited rows: gather, edit, dropout, ``put_rows`` into a copy.
    """
    if dropout > 0.0 and training:
        if h.numel() == 0:
            return h
        sel, _ = row_selector(h, index)
        edited = F.dropout(iv(as_2d_plus(h)[sel]), dropout, training=True)
        return put_rows(h, index, edited)  # exact gradients with padding entries (not put_rows_)
    # ``h._base is not None`` rather than ``h._is_view()``: the same test, and torch.compile traces
    # it (``_is_view()`` is a graph break)
    if copy or (h.requires_grad and h.is_leaf) or h._base is not None:
        return iv(h, index)
    fresh = getattr(iv, "_edit_fresh_rows_", None)  # a ReFT module; a mixed batch's editor has none
    return iv(h, index, inplace=True) if fresh is None else fresh(h, index)


class _RedHook:
    """Forward hook of a RED site: ``y = h * scale + bias`` on the module's output, every token.
    A callable object rather than a closure, so that ``copy.deepcopy(model)`` gives the copy hooks
    bound to its own interventions (TRL builds DPO reference models that way). ``site``: (config
    number, key) of the intervention, where a mixed-adapter batch finds every adapter's."""

    def __init__(self, handle, iv, site):
        self.handle, self.iv, self.site = handle, iv, site

    def __call__(self, module, args, output):
        handle = self.handle
        if not handle._enabled or handle._red_merged is not None:
            return None
        h, rebuild = _split_output(output)
        if handle._mixed is not None:
            from ..multi import red_multi

            scale, bias = handle._mixed.red_terms(*self.site)
            return rebuild(red_multi(h, scale, bias, handle._mixed.red_ids(h), backend=self.iv.backend))
        return rebuild(self.iv(h))


class _ReftHook:
    """Forward hook (with kwargs) of a ReFT site: edits the rows that the layer call's
    ``reft_batch`` keyword lists for this config, one intervention per side."""

    def __init__(self, handle, group: int, ivs, cfg, stack, relay, site):
        self.handle, self.group, self.ivs, self.cfg = handle, group, list(ivs), cfg
        self.stack = stack  # "encoder"/"decoder" in an encoder-decoder model (see seq2seq.py)
        self.relay = relay  # a sub-layer site's RowsRelay (its module is called without the rows)
        self.site = site  # (config number, one key per side): where a mixed batch finds each adapter's

    def __call__(self, module, args, kwargs, output):
        batch = kwargs.get(KWARG)
        if batch is None and self.relay is not None:
            if not self.handle._enabled:
                return None
            batch = self.relay.rows(module)
            if batch is None:
                return None  # the layer was called on its own
        if isinstance(batch, dict):  # an encoder-decoder model's rows, one entry per stack
            batch = batch.get(self.stack)
            if batch is None:
                return None
        if batch is None:
            if self.handle._enabled and self.handle._in_forward:
                raise RuntimeError(
                    f"{type(module).__name__} was called without the '{KWARG}' keyword: this model's "
                    "forward does not pass its keyword arguments down to its layers, which ReFT needs "
                    "(transformers 5.x models do)"
                )
            return None  # disabled, or the layer was called on its own
        if batch.decode:
            return None
        h, rebuild = _split_output(output)
        if h.dim() != 3:
            raise ValueError(f"a ReFT site must output (batch, seq, d) hidden states, got {tuple(h.shape)}")
        for iv, index in zip(mixed_sides(self, batch, h), batch.rows[self.group]):
            if index.device != h.device:  # a model split across devices (device_map)
                index = index.to(h.device)
                remember_index_checked(index, h.numel() // h.shape[-1])
            h = _edit_rows(iv, h, index, self.cfg.dropout, iv.training)
        return rebuild(h)


def mixed_sides(hook, batch, h):
    """The interventions a ReFT hook applies, one per side: its own, or in a mixed-adapter batch
    (``adapter_names``) editors that give each row its example's adapter (``mixed_batch.py``)."""
    if batch.mixed is None:
        return hook.ivs
    gi, keys = hook.site
    return [batch.mixed.editor(gi, key, iv, index, h.shape[1])
            for key, iv, index in zip(keys, hook.ivs, batch.rows[hook.group])]


def _method(fn, template, bound_sig=None):
    """A fresh function calling ``fn(self, ...)``, named and documented like ``template`` (the
    class's own method), with signature ``bound_sig`` once bound when given. It holds no
    reference to the model: bound with ``types.MethodType``, ``copy.deepcopy(model)`` rebinds
    it to the copy."""
    out = functools.update_wrapper(lambda self, *args, **kwargs: fn(self, *args, **kwargs), template)
    if bound_sig is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        out.__signature__ = bound_sig.replace(parameters=[self_param] + list(bound_sig.parameters.values()))
    return out


def _patched_forward(model, *args, intervention_locations=None, **kwargs):
    """``model.forward`` with interventions: builds the batch's rows once and passes them to every
    layer as the keyword ``reft_batch``.

    Written to be traced whole by ``torch.compile(fullgraph=True)``: the arguments are found by
    name in a plain dict (no ``inspect.Signature.bind``), the model's own forward is called as a
    function with the model as its first argument (Dynamo rebuilds a bound method
    ``type(model).forward.__get__(model)`` as ``model.forward`` after a graph break, which is
    this wrapper again: endless recursion), and the rows are built with no host synchronisation
    inside a compiled region (see ``batch.build_batch``)."""
    handle = model.reft
    names = kwargs.pop("adapter_names", None)
    mixed = _mixed_state(model, names, args, kwargs) if names is not None and handle._enabled else None
    if not handle._enabled or not handle._reft_groups or KWARG in kwargs:
        if mixed is not None:  # RED alone: its hooks read the adapters from the handle
            return _call_with_rows(handle, args, kwargs, mixed)
        return handle._call_inner(args, kwargs)
    given = dict(zip(handle._positional, args))  # positional arguments by name, then keywords
    given.update(kwargs)
    ids, embeds = given.get("input_ids"), given.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if not handle._seq2seq and (ref is None or ref.dim() < 2):
        raise ValueError("ReFT needs input_ids (batch, seq) or inputs_embeds (batch, seq, d) to place its "
                         "interventions")
    if handle._seq2seq:
        rows = seq2seq_batch(handle, given, intervention_locations)
        if mixed is not None:  # both stacks' examples are the batch's: the same ids
            rows = {k: (v if v is None else dataclasses.replace(v, mixed=mixed)) for k, v in rows.items()}
        kwargs[KWARG] = rows
        return _call_with_rows(handle, args, kwargs, mixed)
    bsz, seq = ref.shape[:2]
    decode = cache_length(given.values()) > 0
    mask = given.get("attention_mask")
    width = handle._prompt_width
    if intervention_locations is None and width is not None and seq > width and not decode:
        # inside generate without a KV cache: the prompt is the first `width` columns
        real = mask if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (bsz, seq) else None
        mask = torch.ones(bsz, seq, dtype=torch.long, device=ref.device) if real is None else real.clone()
        mask[:, width:] = 0
    prompt_lengths = None
    labels = given.get("labels")
    if (intervention_locations is None and width is None and not decode and handle._prompt_from_labels
            and isinstance(labels, torch.Tensor) and tuple(labels.shape) == (bsz, seq)):
        # a causal LM's training batch: the prompt is where the labels are masked (ReftDataCollator's)
        real = mask if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (bsz, seq) else \
            torch.ones(bsz, seq, dtype=torch.long, device=ref.device)
        prompt_lengths, unknown = prompt_lengths_from_labels(real, labels)
        handle._label_watch.watch(unknown)
    batch = build_batch([handle.configs[g] for g in handle._reft_groups], bsz, seq, mask,
                        intervention_locations, decode, ref.device, prompt_lengths)
    kwargs[KWARG] = batch if mixed is None else dataclasses.replace(batch, mixed=mixed)
    return _call_with_rows(handle, args, kwargs, mixed)


def _mixed_state(model, names, args, kwargs):
    """The ``MixedAdapters`` of a forward called with ``adapter_names`` (see ``mixed_batch.py``)."""
    handle = model.reft
    if KWARG in kwargs or handle._mixed is not None:
        raise ValueError("adapter_names: the model was called with adapter_names inside another forward")
    if handle._red_merged is not None:
        raise ValueError("adapter_names: RED is merged into the model's weights, so every example would get the "
                         "active adapter's RED: call unmerge_red(model) first")
    given = dict(zip(handle._positional, args))
    given.update(kwargs)
    # an encoder-decoder model's decoder steps come without the encoder's inputs
    keys = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels")
    ref = next((given[k] for k in keys if isinstance(given.get(k), torch.Tensor) and given[k].dim() >= 2), None)
    if ref is None:
        raise ValueError("adapter_names needs input_ids (batch, seq) or inputs_embeds (batch, seq, d)")
    return mixed_adapters(handle, adapter_ids(handle, names, ref.shape[0], ref.device))


def _call_with_rows(handle, args, kwargs, mixed=None):
    """The model's own forward, its keywords carrying the rows (a layer without rows is then an
    error); ``mixed``: a mixed-adapter batch's ``MixedAdapters``, on the handle during the call
    for RED's hooks."""
    before, before_mixed = handle._in_forward, handle._mixed
    handle._in_forward, handle._mixed = True, mixed
    try:
        if not getattr(kwargs.get(KWARG), "decode", False):  # a decode step edits nothing
            share_rotations(handle)
        return handle._call_inner(args, kwargs)
    finally:
        handle._in_forward, handle._mixed = before, before_mixed


def _patched_generate(model, *args, **kwargs):
    """``model.generate`` with ReFT: records the prompt's width for the forwards of this call, so
    that a step without a KV cache (a full forward over prompt + generated tokens) takes its
    default positions from the prompt columns only, as the prefill with a cache does."""
    handle = model.reft
    prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(prompt, torch.Tensor):
        prompt = kwargs.get("inputs_embeds")
    if kwargs.get("adapter_names") is not None:
        # names become a (B,) tensor of ids, which beam search and num_return_sequences expand
        # with the other inputs (a list would not be)
        if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
            raise ValueError("generate with adapter_names needs input_ids (batch, seq) or inputs_embeds")
        kwargs["adapter_names"] = adapter_ids(handle, kwargs["adapter_names"], prompt.shape[0], prompt.device)
    before = handle._prompt_width
    handle._prompt_width = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
    if handle._seq2seq:  # the decoder's prompt (the encoder's input is encoded whole)
        handle._prompt_width = decoder_prompt_width(kwargs)
    try:
        return handle._inner("generate")(*args, **kwargs)
    finally:
        handle._prompt_width = before


class ReftHandle(AdapterMethods):
    """The interventions attached to one model, and how to undo them; ``model.reft``. Named
    adapters (``add_adapter``, ``set_adapter``, ``delete_adapter``): see ``adapters.py``."""

    def __init__(self, model: nn.Module, configs: tuple, disable_model_grads: bool = True,
                 modules_to_save: tuple = ()):
        self.model = model
        self.configs = configs
        self.disable_model_grads = disable_model_grads
        self.modules_to_save = modules_to_save  # the names as given (see extras.py)
        self.extra_modules = []  # [(module name, module)] that modules_to_save selects
        self._extra_originals = {}  # their state before attaching, on the CPU (for remove())
        self.model_type = model_type(model)
        self.sites = []  # per config: [(key, layer, module name)]
        self.num_layers = []  # per config: layers the model has for that site kind
        self.hidden_size = None
        self._enabled = True
        self._prompt_width = None  # inside generate: the prompt's width (see _patched_generate)
        self._red_merged = None  # merge_red: {module name: (weight, bias or None)} originals on the CPU
        self._in_forward = False  # inside the patched forward (a layer without rows is then an error)
        self._mixed = None  # inside a forward with adapter_names: its MixedAdapters (see mixed_batch.py)
        self._hooks = []
        self._requires_grad = {}
        self._had_forward = self._had_generate = None
        self._patches = []  # [(object, attribute, its previous instance value or None)]
        self._reft_groups = []  # indices of the active adapter's ReFT configs
        self._seq2seq = False  # an encoder-decoder model whose active adapter has ReFT
        self._forward_takes_kwargs = True
        self._prompt_from_labels = _is_causal_lm(model)
        self._label_watch = FlagWatch(UNKNOWN_PROMPT)
        self.active_adapter = None  # the active adapter's name (see adapters.py)
        self._active = None  # its _Adapter
        self._inactive = {}  # {name: _Adapter} of the others, their modules in model.reft_adapters

    # ------------------------------------------------------------------ public
    @property
    def interventions(self) -> nn.ModuleList:
        return getattr(self.model, MODULE_ATTR)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @contextlib.contextmanager
    def disabled(self, adapter_name: str | None = None):
        """Forwards inside run the base model unedited (reference forwards, as DPO needs). Use it
        for forwards whose backward runs inside the context too (or under no_grad): RED's hooks
        read the flag when gradient checkpointing recomputes them. The ``modules_to_save`` keep
        their trained values inside (they are the model's own modules; ``remove()`` restores them).

        ``adapter_name``: disable that adapter only. Only the active adapter edits a forward, so
        for an inactive one nothing changes inside (its name must exist: ValueError otherwise)."""
        if adapter_name is not None:
            self._known(adapter_name, "disabled()")
            if adapter_name != self.active_adapter:
                yield self.model
                return
        if self._red_merged is not None:
            raise RuntimeError("RED is merged into the model's weights, so disabled() cannot give the base "
                               "model: call unmerge_red(model) first")
        before = self._enabled
        self._enabled = False
        try:
            yield self.model
        finally:
            self._enabled = before

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts of the whole model, interventions included."""
        seen, trainable, total = set(), 0, 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> str:
        trainable, total = self.trainable_parameters()
        line = (f"trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
        print(line)
        return line

    def remove(self) -> nn.Module:
        """Detach everything: hooks, the wrapped methods, ``reft_interventions``, ``model.reft``;
        restores each base parameter's ``requires_grad`` and the ``modules_to_save`` as they were
        before attaching (their trained values are dropped, as PEFT's ``unload()`` does; save them
        first). Other hooks are left alone. Returns the model, as it was before ``get_reft_model``."""
        self._check_attached("remove()")
        self._detach(restore_extras=True)
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """RED folded into the weights and everything else detached: a plain ``transformers``
        model; see ``reft_kernels.hf.merge.merge_and_unload``."""
        from .merge import merge_and_unload

        return merge_and_unload(self.model)

    def _check_attached(self, what: str) -> None:
        if getattr(self.model, HANDLE_ATTR, None) is not self:
            raise RuntimeError("these interventions were already removed from the model")
        if self._red_merged is not None:
            raise RuntimeError(f"RED is merged into the model's weights: call unmerge_red(model) before {what}")

    def _detach(self, restore_extras: bool) -> None:
        """Undo the attach: hooks, wrapped methods, the interventions module, ``requires_grad``,
        the handle; the ``modules_to_save`` values too when ``restore_extras``."""
        model = self.model
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._restore("forward", self._had_forward)
        self._restore("generate", self._had_generate)
        for obj, attr, previous in reversed(self._patches):
            _set_or_delete(obj, attr, previous)
        self._patches.clear()
        delattr(model, MODULE_ATTR)
        if hasattr(model, ADAPTERS_ATTR):
            delattr(model, ADAPTERS_ATTR)
        self._inactive.clear()
        if restore_extras:
            extras.restore(self.extra_modules, self._extra_originals)
        for name, p in model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        delattr(model, HANDLE_ATTR)

    # ------------------------------------------------------------------ wrappers
    def _wrap_forward(self):
        model = self.model
        self._had_forward = model.__dict__.get("forward")
        sig = inspect.signature(model.forward)  # the bound method (or the previous instance attribute)
        params = list(sig.parameters.values())
        for taken in ("intervention_locations", "adapter_names"):
            if taken in sig.parameters:
                raise ValueError(f"the model's forward already has an {taken!r} argument")
        new = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
               for name in ("intervention_locations", "adapter_names")]
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        self._positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        patched = sig.replace(parameters=params[:at] + new + params[at:])
        model.forward = types.MethodType(_method(_patched_forward, type(model).forward, patched), model)

    def _wrap_generate(self):
        model = self.model
        self._had_generate = model.__dict__.get("generate")
        if callable(getattr(model, "generate", None)):
            model.generate = types.MethodType(_method(_patched_generate, type(model).generate), model)

    def _wrap_save_and_peft(self):
        from .checkpoint import is_peft_model, save_adapter
        from .peft_interplay import warn_if_inside_peft, wrap_peft

        if callable(getattr(type(self.model), "save_pretrained", None)):
            self._patch(self.model, "save_pretrained", save_adapter)
            if hasattr(self.model, "_keys_to_ignore_on_save"):  # a transformers model: see quiet_resume
                self._patches.append((self.model, "_keys_to_ignore_on_save",
                                      self.model.__dict__.get("_keys_to_ignore_on_save")))
        if is_peft_model(self.model):
            wrap_peft(self)
        else:
            warn_if_inside_peft(self.model)

    def _inner(self, attr, obj=None):
        """``obj``'s own ``attr`` (what it was before attaching), bound to it; ``obj`` defaults to
        the model."""
        obj = self.model if obj is None else obj
        if obj is self.model and attr in ("forward", "generate"):
            previous = self._had_forward if attr == "forward" else self._had_generate
        else:
            previous = next((prev for o, a, prev in self._patches if o is obj and a == attr), None)
        return previous if previous is not None else getattr(type(obj), attr).__get__(obj)

    def _patch(self, obj, attr, fn, template=None):
        """Set ``obj.attr`` (an instance attribute) to ``fn`` bound to the model; ``remove()`` puts
        back what was there."""
        self._patches.append((obj, attr, obj.__dict__.get(attr)))
        template = template if template is not None else getattr(type(obj), attr)
        object.__setattr__(obj, attr, types.MethodType(_method(fn, template), self.model))

    def _call_inner(self, args, kwargs):
        """Call the model's own forward (what it was before attaching). The class's function is
        called with the model as first argument rather than through a bound method: see
        ``_patched_forward``."""
        if self._had_forward is not None:
            return self._had_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def _restore(self, attr, previous):
        model = self.model
        if attr in model.__dict__:
            if previous is None:
                delattr(model, attr)
            else:
                setattr(model, attr, previous)

    # ------------------------------------------------------------------ attach
    def _build(self, name: str, configs: tuple) -> _Adapter:
        """The interventions of ``configs`` built for this model (on the sites' devices and dtypes)
        and where each goes, as an inactive adapter: nothing on the model changes. Raises
        ValueError for sites the model lacks and anything else a config cannot take."""
        model = self.model
        reft_groups = [i for i, c in enumerate(configs) if isinstance(c, ReftConfig)]
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False) and reft_groups)
        if reft_groups and not self._forward_takes_kwargs:
            raise ValueError(f"{type(model).__name__}.forward takes no **kwargs, so the intervention rows "
                             "cannot reach its layers; ReFT needs a transformers 5.x model")
        ad = _Adapter(name, configs, reft_groups, seq2seq)
        for gi, cfg in enumerate(configs):
            if isinstance(cfg, REDConfig):
                table, what = RED_SITES, "REDConfig"
            else:
                table = REFT_COMPONENT_SITES[cfg.component]
                what = "ReftConfig" if cfg.component == "block_output" else f"ReftConfig(component={cfg.component!r})"
                if seq2seq and cfg.component != "block_output":
                    raise ValueError(f"{what}: an encoder-decoder model takes ReFT on its blocks' outputs only "
                                     "(component='block_output')")
            found, n_layers = find_sites(model, cfg, table, what)
            ad.num_layers.append(n_layers)
            ad.sites.append([(key, layer, name_) for key, layer, name_, _ in found])
            ivs = nn.ModuleDict()
            for key, _, site_name, module in found:
                dtype, device = param_dtype_device(module)
                dtype = cfg.torch_dtype or dtype
                if isinstance(cfg, REDConfig):
                    d = red_width(model, cfg, module)
                    ivs[key] = RED(d, dtype=dtype, device=device, backend=cfg.backend)
                    ad.plans.append((module, "red", (ivs[key], (gi, key))))
                else:
                    d = hidden_size(model)
                    if cfg.rank > d:
                        raise ValueError(f"ReftConfig rank={cfg.rank} exceeds the hidden size {d}")
                    ad.hidden_size = d
                    sides, keys = [], []
                    for side in cfg.sides:
                        name_ = f"{key}_{side}" if side else key
                        ivs[name_] = cfg.build(d, dtype=dtype, device=device)
                        sides.append(ivs[name_])
                        keys.append(name_)
                    parent = None
                    if cfg.component in SUBLAYER_COMPONENTS:
                        parent_name = site_name.rpartition(".")[0]
                        parent = model.get_submodule(parent_name) if parent_name else None
                        if parent is None:
                            raise ValueError(f"{what}: the site {site_name!r} has no parent layer to take the rows from")
                    ad.plans.append((module, gi, (sides, stack_of(key) if seq2seq else None, parent, (gi, tuple(keys)))))
            ad.groups.append(ivs)
        ad.groups.train(model.training)  # new modules start in training mode; follow the model's
        return ad

    def _activate(self, ad: _Adapter) -> None:
        """Make ``ad`` the active adapter: its interventions become ``model.reft_interventions``
        and its hooks are registered (``ad`` must not be in ``reft_adapters``)."""
        model = self.model
        self._active = ad
        self.active_adapter = ad.name
        self.configs, self.sites, self.num_layers, self.hidden_size = ad.configs, ad.sites, ad.num_layers, ad.hidden_size
        self._reft_groups, self._seq2seq = ad.reft_groups, ad.seq2seq
        model.add_module(MODULE_ATTR, ad.groups)
        try:
            # prepend=True puts each hook before those already there: registering in reverse keeps
            # the configs' order among ours (two configs on one layer apply in the order listed)
            # while all of ours run before any other hook
            for module, kind, what in reversed(ad.plans):
                if kind == "red":
                    self._hooks.append(module.register_forward_hook(_RedHook(self, *what), prepend=True))
                    continue
                # the batch's rows are listed per ReFT config, in the order of _reft_groups
                sides, stack, parent, site = what
                cfg, group = ad.configs[kind], ad.reft_groups.index(kind)
                if cfg.component == "block_input":
                    hook = ReftInputHook(self, group, sides, cfg, _edit_rows, site, mixed_sides)
                    self._hooks.append(module.register_forward_pre_hook(hook, prepend=True, with_kwargs=True))
                    continue
                relay = None
                if parent is not None:
                    relay = RowsRelay(self, parent)
                    self._hooks.append(parent.register_forward_pre_hook(relay, with_kwargs=True))
                hook = _ReftHook(self, group, sides, cfg, stack, relay, site)
                self._hooks.append(module.register_forward_hook(hook, prepend=True, with_kwargs=True))
            if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and \
                    callable(getattr(model, "get_encoder", None)):
                # generate runs the encoder itself: its rows and its adapter_names (RED too)
                pre = EncoderPreHook(self)
                encoder = model.get_encoder()
                self._hooks.append(encoder.register_forward_pre_hook(pre, with_kwargs=True))
                self._hooks.append(encoder.register_forward_hook(pre.restore, always_call=True))
        except BaseException:
            self._deactivate()
            raise

    def _quiet_resume(self) -> None:
        if any(o is self.model and a == "_keys_to_ignore_on_save" for o, a, _ in self._patches):
            from .checkpoint import quiet_resume

            quiet_resume(self)

    def _deactivate(self) -> None:
        """Remove the active adapter's hooks and ``model.reft_interventions`` (the modules stay in
        ``self._active.groups``)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.model.__dict__["_modules"].pop(MODULE_ATTR, None)

    def _attach(self, adapter_name: str):
        model = self.model
        self._forward_takes_kwargs = _takes_var_kwargs(model.forward)
        ad = self._build(adapter_name, self.configs)
        self.extra_modules = extras.resolve_modules_to_save(model, self.modules_to_save, MODULE_ATTR)
        # everything that can fail has been checked: change the model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._extra_originals = extras.snapshot(self.extra_modules)
        if self.disable_model_grads:
            for p in model.parameters():
                p.requires_grad_(False)
        extras.unfreeze(self.extra_modules)
        try:
            self._wrap_forward()
            self._wrap_generate()
            self._wrap_save_and_peft()
            self._activate(ad)
            object.__setattr__(model, HANDLE_ATTR, self)
            self._quiet_resume()
        except BaseException:
            self._deactivate()
            self._restore("forward", self._had_forward)
            self._restore("generate", self._had_generate)
            for obj, attr, previous in reversed(self._patches):
                _set_or_delete(obj, attr, previous)
            self._patches.clear()
            for name, p in model.named_parameters():
                p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
            raise


class _Adapter:
    """One named set of interventions: its configs, their modules (``groups``: one ModuleDict per
    config, keyed by site), where each hook goes (``plans``), the sites found and the model facts
    a save records; ``grad``: each parameter's ``requires_grad`` while the adapter is inactive
    (its parameters are then frozen), restored when it is activated again."""

    def __init__(self, name: str, configs: tuple, reft_groups: list, seq2seq: bool):
        self.name, self.configs, self.reft_groups, self.seq2seq = name, configs, reft_groups, seq2seq
        self.groups = nn.ModuleList()
        self.plans, self.sites, self.num_layers = [], [], []
        self.hidden_size = None
        self.grad = None


def _takes_var_kwargs(fn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def get_reft_model(model: nn.Module, config_or_configs, *, verbose: bool = True,
                   disable_model_grads: bool = True, modules_to_save=None,
                   adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Attach the interventions of ``config_or_configs`` (a ``REDConfig``, a ``ReftConfig`` or a
    list of them) to ``model`` in place, freeze its base parameters, and return it.

    ``modules_to_save`` (PEFT's name): a list of base module names, e.g. ``["classifier"]`` for
    the new head of a sequence-classification model, that train beside the interventions and are
    saved and loaded with them (``save_interventions`` / ``load_interventions``,
    ``save_pretrained``); an entry matches a module's full name or its last dotted parts. It is
    a keyword here rather than a config field because it belongs to the model, not to one
    intervention. ``remove()`` restores those modules' values and ``requires_grad``;
    ``disabled()`` leaves them as trained.

    ``adapter_name`` names this set of interventions (``"default"``, as PEFT names its first
    adapter); more can be added, switched and removed by name: ``model.reft.add_adapter(name,
    config)``, ``set_adapter(name)``, ``delete_adapter(name)`` (see ``adapters.py``).

    ``disable_model_grads=False`` (pyreft's keyword) leaves every base parameter's
    ``requires_grad`` as it is: for a model that already carries trainable adapters, e.g. a
    ``peft.PeftModel`` with LoRA (pass the PeftModel itself), so that the adapters and the
    interventions train together.

    The handle is ``model.reft`` (``disabled()``, ``remove()``, ``print_trainable_parameters()``);
    the interventions are ``model.reft_interventions``. Prints the trainable-parameter summary
    unless ``verbose=False``. Raises ValueError for an unsupported model type (listing the
    supported ones), layers the model does not have, or a model that already has interventions;
    on any error the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, HANDLE_ATTR, None) is not None or hasattr(model, MODULE_ATTR):
        raise ValueError("this model already has interventions: add another set with "
                         "model.reft.add_adapter(name, config), or call model.reft.remove() first")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("attach the interventions before wrapping the model in DistributedDataParallel")
    if not isinstance(disable_model_grads, bool):
        raise TypeError(f"disable_model_grads must be a bool, got {type(disable_model_grads).__name__}")
    names = extras.check_modules_to_save(modules_to_save)
    check_adapter_name(adapter_name)
    handle = ReftHandle(model, as_configs(config_or_configs), disable_model_grads, names)
    handle._attach(adapter_name)
    if verbose:
        handle.print_trainable_parameters()
    return model


def get_handle(model) -> ReftHandle:
    handle = getattr(model, HANDLE_ATTR, None)
    if not isinstance(handle, ReftHandle):
        raise ValueError("this model has no interventions attached (see reft_kernels.hf.get_reft_model)")
    return handle


def _set_or_delete(obj, attr, previous) -> None:
    """Put back an instance attribute that ``ReftHandle._patch`` replaced (delete it when there was
    none, so the class's own method shows again)."""
    if previous is None:
        obj.__dict__.pop(attr, None)
    else:
        object.__setattr__(obj, attr, previous)


def _is_causal_lm(model) -> bool:
    """Whether ``model`` is a decoder-only model that generates (a causal LM): its training labels
    then mark the prompt with -100. Encoders (sequence or token classification) and
    encoder-decoder models take their positions from the attention mask alone."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # a wrapper whose can_generate needs more than the model
        return False
