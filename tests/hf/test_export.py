"""``merge_and_unload``: RED folded into the weights for good, a plain ``transformers`` model that
``save_pretrained`` writes and ``from_pretrained`` reads back to the same logits, for every
architecture with a RED site; architectures that cannot carry an added bias say so.

References: the hooked (unmerged) model's logits, a fresh model of the same seed (what the base
was: hooks, attributes, shared storage), and the reloaded model's own weights.
"""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, merge_and_unload, merge_red

from ._models import ARCHS, model_inputs, padded_batch, tiny_model, transformers

CARRY_BIAS = ("llama", "gpt2", "bert", "roberta")  # a bias on the edited layer, or a config option for one
NO_BIAS_OPTION = ("mistral", "qwen2", "t5")


def test_every_architecture_with_a_red_site_is_covered():
    assert sorted(CARRY_BIAS + NO_BIAS_OPTION) == sorted(ARCHS)


def _red_model(arch, layers="all", zero_bias=False, modules_to_save=None):
    model = tiny_model(arch)
    get_reft_model(model, REDConfig(layers=layers), verbose=False, modules_to_save=modules_to_save)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for iv in model.reft_interventions[0].values():
            iv.scale.copy_(1.0 + 0.5 * torch.randn(iv.scale.shape, generator=g))
            iv.bias.copy_(0.0 if zero_bias else 0.5 * torch.randn(iv.bias.shape, generator=g))
    return model


def _logits(model, arch):
    ids, mask = padded_batch([6, 9], 9, "right", seed=1)
    with torch.no_grad():
        return model(**model_inputs(arch, ids, mask)).logits


def _sharing(model):
    """Groups of parameter names that share storage (tied weights), as sorted tuples."""
    by_ptr = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    return sorted(tuple(sorted(v)) for v in by_ptr.values() if len(v) > 1)


def _assert_plain(model, arch):
    base = tiny_model(arch)
    assert not hasattr(model, "reft") and not hasattr(model, "reft_interventions")
    assert not {"forward", "generate", "save_pretrained"} & set(vars(model))
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    assert hooks(model) == hooks(base)
    assert _sharing(model) == _sharing(base)
    assert all(p.requires_grad for p in model.parameters())  # as the base had them


def _round_trip(model, arch, path):
    model.save_pretrained(path)
    back = type(model).from_pretrained(path).eval()
    assert back.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(_logits(back, arch), _logits(model, arch))
    return back


@pytest.mark.parametrize("layers", ["all", [1]], ids=["all", "one"])
@pytest.mark.parametrize("arch", CARRY_BIAS)
def test_export_round_trip(arch, layers, tmp_path):
    model = _red_model(arch, layers)
    hooked = _logits(model, arch)
    assert not torch.allclose(hooked, _logits(tiny_model(arch), arch), atol=1e-3)
    out = merge_and_unload(model)
    assert out is model
    _assert_plain(model, arch)
    torch.testing.assert_close(_logits(model, arch), hooked, rtol=1e-4, atol=1e-4)
    back = _round_trip(model, arch, tmp_path)
    if arch == "llama":  # the config now gives every MLP projection a bias; the others hold zeros
        assert back.config.mlp_bias is True
        up = [p for n, p in back.named_parameters() if n.endswith(("up_proj.bias", "gate_proj.bias"))]
        assert len(up) == 6 and all(torch.count_nonzero(b) == 0 for b in up)


@pytest.mark.parametrize("arch", NO_BIAS_OPTION)
def test_export_without_a_bias_option_refuses_and_leaves_the_model(arch):
    model = _red_model(arch)
    hooked = _logits(model, arch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"this {arch} model's config offers no way to add one"):
        merge_and_unload(model)
    assert hasattr(model, "reft")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(_logits(model, arch), hooked)


@pytest.mark.parametrize("arch", NO_BIAS_OPTION)
def test_export_scale_only_where_there_is_no_bias(arch, tmp_path):
    """RED with a zero bias needs no bias on the layer: only the scale is folded in."""
    model = _red_model(arch, zero_bias=True)
    hooked = _logits(model, arch)
    names = {n for n, _ in tiny_model(arch).named_parameters()}
    merge_and_unload(model)
    assert {n for n, _ in model.named_parameters()} == names
    _assert_plain(model, arch)
    torch.testing.assert_close(_logits(model, arch), hooked, rtol=1e-4, atol=1e-4)
    _round_trip(model, arch, tmp_path)


def test_export_refuses_reft():
    model = tiny_model("llama")
    get_reft_model(model, [REDConfig(), ReftConfig(rank=4, positions="f1+l1")], verbose=False)
    with pytest.raises(ValueError, match=r"ReFT interventions \(loreft\) .* cannot be merged"):
        merge_and_unload(model)
    assert hasattr(model, "reft") and model.reft._red_merged is None


def test_export_after_merge_red_equals_direct_export():
    direct, merged = _red_model("llama"), _red_model("llama")
    merge_red(merged)
    assert merged.reft.interventions[0]["layer0"].bias.data_ptr() != \
        merged.model.layers[0].mlp.down_proj.bias.data_ptr()  # merge_red's added bias has its own storage
    merge_and_unload(direct)
    merge_and_unload(merged)
    assert torch.equal(_logits(merged, "llama"), _logits(direct, "llama"))
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), direct.parameters()))


def test_merged_model_save_pretrained_refuses():
    model = _red_model("llama")
    merge_red(model)
    with pytest.raises(RuntimeError, match="call unmerge_red"):
        model.save_pretrained("unused")


def test_export_keeps_trained_modules_to_save(tmp_path):
    model = _red_model("bert", modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # as training would change it
    want = model.classifier.weight.detach().clone()
    hooked = _logits(model, "bert")
    merge_and_unload(model)
    assert torch.equal(model.classifier.weight, want)
    torch.testing.assert_close(_logits(model, "bert"), hooked, rtol=1e-4, atol=1e-4)
    _round_trip(model, "bert", tmp_path)


def test_handle_method_is_the_same_export():
    a, b = _red_model("gpt2"), _red_model("gpt2")
    merge_and_unload(a)
    assert b.reft.merge_and_unload() is b
    assert torch.equal(_logits(a, "gpt2"), _logits(b, "gpt2"))
    assert isinstance(b, transformers.GPT2LMHeadModel)
