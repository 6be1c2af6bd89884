"""Helpers for the get_reft_model tests: reference forward hooks written from the math (gather the
edited rows, apply ``reft_kernels.reference``, scatter back), parameter randomisation, and a
snapshot of everything attaching may change on a model."""
from __future__ import annotations

import torch

from reft_kernels.reference import lowrank_edit_reference

from ._models import layers_of

# where RED edits, written out here (not read from reft_kernels.hf.sites): module names per layer
_RED_NAMES = {
    "llama": ["model.layers.{}.mlp.down_proj"],
    "mistral": ["model.layers.{}.mlp.down_proj"],
    "qwen2": ["model.layers.{}.mlp.down_proj"],
    "gpt2": ["transformer.h.{}.mlp.c_proj"],
    "bert": ["bert.encoder.layer.{}.output.dense"],
    "roberta": ["roberta.encoder.layer.{}.output.dense"],
    "t5": ["encoder.block.{}.layer.1.DenseReluDense.wo", "decoder.block.{}.layer.2.DenseReluDense.wo"],
}


def red_site_names(arch, layer):
    """[(intervention key, module name)] of the RED sites of one layer."""
    out = []
    for name in _RED_NAMES[arch]:
        key = f"{name.split('.')[0]}{layer}" if arch == "t5" else f"layer{layer}"
        out.append((key, name.format(layer)))
    return out


def randomize_(module, std=0.5, seed=1):
    """Non-trivial values for every parameter of ``module`` (random normal), so that no edit is
    near the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def _split(out):
    if isinstance(out, tuple):
        return out[0], lambda h: (h,) + tuple(out[1:])
    return out, lambda h: h


def gather_edit_scatter(h, sides):
    """``h`` (B, S, d) with, for each (intervention, locations (B, P)) in ``sides`` in order, the rows
    ``h[b, locations[b, p]]`` (entries >= 0) replaced by the reference edit of those rows."""
    h = h.clone()
    for iv, loc in sides:
        b_idx, p_idx = (loc >= 0).nonzero(as_tuple=True)
        pos = loc[b_idx, p_idx]
        rows = h[b_idx, pos]  # gather (n, d)
        edited = lowrank_edit_reference(rows, *iv.edit_terms(), act=iv.act)
        h = h.index_put((b_idx, pos), edited)  # scatter
    return h


def reft_sides(ivs, layer, locations, share_weights):
    """[(intervention, (B, P) locations)] applied at ``layer``: one shared, or first then last."""
    if share_weights:
        return [(ivs[f"layer{layer}"], locations.reshape(locations.shape[0], -1))]
    return [(ivs[f"layer{layer}_first"], locations[:, 0]), (ivs[f"layer{layer}_last"], locations[:, 1])]


def add_reft_reference_hooks(ref_model, ivs, layers, locations, share_weights):
    """Forward hooks on ``ref_model``'s (unpatched) layers doing the ReFT edit from the math;
    returns the hook handles."""
    handles = []
    for layer in layers:
        sides = reft_sides(ivs, layer, locations, share_weights)

        def hook(module, args, out, sides=sides):
            h, rebuild = _split(out)
            return rebuild(gather_edit_scatter(h, sides))

        handles.append(layers_of(ref_model)[layer].register_forward_hook(hook))
    return handles


def add_red_reference_hooks(ref_model, arch, ivs, layers):
    """Forward hooks ``y = h * scale + bias`` on ``ref_model``'s RED sites; returns the handles."""
    modules = dict(ref_model.named_modules())
    handles = []
    for layer in layers:
        for key, name in red_site_names(arch, layer):
            iv = ivs[key]

            def hook(module, args, out, iv=iv):
                h, rebuild = _split(out)
                return rebuild(h * iv.scale.to(h.dtype) + iv.bias.to(h.dtype))

            handles.append(modules[name].register_forward_hook(hook))
    return handles


def freeze_(model):
    """Freeze every parameter, as attaching does (T5's CPU attention rounds differently when its
    parameters require grad, so base runs are compared in the same state)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weighted_sum(logits, seed=2):
    """A scalar loss with random weights (no symmetry that could hide a wrong gradient)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(logits.dtype)
    return (logits * w).sum()


def grads_of(params):
    """{name: grad clone} and zero the grads."""
    out = {}
    for name, p in params:
        assert p.grad is not None, f"{name} got no gradient"
        out[name] = p.grad.detach().clone()
        p.grad = None
    return out


def compare_with_hooked_reference(model, ref, kw, ivs, add_hooks, ref_kw=None):
    """The patched ``model``'s logits and the gradients of every parameter of ``ivs`` against
    ``ref`` (an unpatched copy) run with the reference hooks that ``add_hooks()`` registers (and
    returns), float64 tolerances; the hooks must change ``ref``'s logits and every gradient must
    be nonzero. ``ref_kw``: ``ref``'s inputs when they differ from ``kw``."""
    ref_kw = kw if ref_kw is None else ref_kw
    params = list(ivs.named_parameters())
    got = model(**kw).logits
    weighted_sum(got).backward()
    got_grads = grads_of(params)
    base = ref(**ref_kw).logits
    handles = add_hooks()
    try:
        want = ref(**ref_kw).logits
    finally:
        for h in handles:
            h.remove()
    weighted_sum(want).backward()
    want_grads = grads_of(params)
    assert not torch.allclose(base, want, rtol=1e-3, atol=0), "the edit should change the logits"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name in got_grads:
        assert want_grads[name].abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, msg=name)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def snapshot(model):
    """Everything attaching may change, in a comparable form: the model's attribute names and
    ``forward`` entry, its submodules, every hook dict of every submodule (keys and the hook
    objects), and every parameter's ``requires_grad``."""
    hooks = {}
    for name, m in model.named_modules():
        for attr in dict.fromkeys(_HOOK_DICTS + tuple(a for a in vars(m) if "hook" in a)):
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                hooks[(name, attr)] = [(k, id(v)) for k, v in d.items()]
    return {
        "dict_keys": sorted(model.__dict__),
        "instance_forward": model.__dict__.get("forward"),
        "modules_keys": list(model._modules),
        "named_modules": [n for n, _ in model.named_modules()],
        "hooks": hooks,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def state_snapshot(model):
    """Everything a failed load could change: parameters and buffers (values, dtypes),
    requires_grad flags, hooks, attributes; compare two with ``assert_same_state``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return state, flags, hooks, sorted(model.__dict__), sorted(model._modules)


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert a[0][k].dtype == b[0][k].dtype and torch.equal(a[0][k], b[0][k]), k
    assert a[1:] == b[1:]
