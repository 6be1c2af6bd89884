"""merge_red / unmerge_red: merged outputs agree with the hooked RED within rounding for every
architecture, unmerge restores weights and biases bit for bit, and the states that would be
wrong while merged (remove, disabled, load) refuse."""
from __future__ import annotations

import warnings

import pytest
import torch

from reft_kernels.hf import (
    REDConfig, ReftConfig, get_reft_model, load_interventions, merge_red, save_interventions, unmerge_red,
)

from ._models import ARCHS, model_inputs, padded_batch, tiny_model


def _red_model(arch, dtype=torch.float32, extra=()):
    model = tiny_model(arch, dtype=dtype)
    get_reft_model(model, [REDConfig(), *extra], verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.copy_((1.0 if p.dim() == 1 and p.shape == () else 0) + torch.randn(p.shape, generator=g) * 0.5)
        for iv in model.reft_interventions[0].values():
            iv.scale.add_(1.0)  # scales around 1, biases around 0, both far from identity
    return model


def _out(model, arch):
    ids, mask = padded_batch([6, 9], 9, "right", seed=1)
    with torch.no_grad():
        return model(**model_inputs(arch, ids, mask)).logits.float()


def _site_state(model):
    """Every parameter of the model outside the interventions, by name (absent biases as None)."""
    out = {}
    for name, module in model.named_modules():
        if "reft_interventions" in name:
            continue
        for pname, p in module._parameters.items():
            out[f"{name}.{pname}"] = None if p is None else (p.dtype, p.detach().clone())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_matches_hooked_and_unmerge_is_exact(arch):
    model = _red_model(arch)
    hooked = _out(model, arch)
    before = _site_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_red(model)
    adds_bias = arch in ("llama", "mistral", "qwen2", "t5")  # their MLP output projections have no bias
    assert any("added a bias" in str(w.message) for w in caught) == adds_bias
    merged = _out(model, arch)
    assert not torch.equal(merged, _out(tiny_model(arch), arch))  # the merge carries the edit
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)
    unmerge_red(model)
    after = _site_state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if v is None:
            assert after[k] is None, k
        else:
            assert after[k][0] == v[0] and torch.equal(after[k][1], v[1]), k
    assert torch.equal(_out(model, arch), hooked)  # hooks run again after unmerge


@pytest.mark.filterwarnings("ignore:merge_red added a bias")
def test_bf16_merge_agrees_within_bf16_rounding():
    model = _red_model("llama", dtype=torch.bfloat16)
    hooked = _out(model, "llama")
    merge_red(model)
    merged = _out(model, "llama")
    scale = hooked.abs().max()
    assert (merged - hooked).abs().max() <= 0.05 * scale
    unmerge_red(model)
    assert torch.equal(_out(model, "llama"), hooked)


@pytest.mark.filterwarnings("ignore:merge_red added a bias")
def test_merge_leaves_reft_running():
    model = _red_model("llama", extra=[ReftConfig(rank=2, positions="f1+l1")])
    hooked = _out(model, "llama")
    merge_red(model)
    torch.testing.assert_close(_out(model, "llama"), hooked, rtol=1e-4, atol=1e-4)


def test_states_that_would_be_wrong_while_merged_refuse(tmp_path):
    model = _red_model("gpt2")
    save_interventions(model, tmp_path)
    merge_red(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_red(model)
    with pytest.raises(RuntimeError, match="unmerge_red"):
        model.reft.remove()
    with pytest.raises(RuntimeError, match="unmerge_red"):
        with model.reft.disabled():
            pass
    with pytest.raises(ValueError, match="unmerge_red"):
        load_interventions(model, tmp_path)
    unmerge_red(model)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_red(model)
    model.reft.remove()
    assert torch.equal(_out(model, "gpt2"), _out(tiny_model("gpt2"), "gpt2"))


def test_merge_needs_red():
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(rank=2), verbose=False)
    with pytest.raises(ValueError, match="no RED intervention"):
        merge_red(model)
    with pytest.raises(ValueError, match="no interventions attached"):
        merge_red(tiny_model("llama"))
