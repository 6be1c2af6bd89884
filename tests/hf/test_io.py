"""save_interventions / load_interventions: exact round trips (attached or not yet attached), and
every damaged or mismatched folder raises ValueError and leaves the model exactly as it was."""
from __future__ import annotations

import json
import os

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, load_interventions, save_interventions
from reft_kernels.hf.io import CONFIG_NAME, WEIGHTS_NAME
from reft_kernels.hf.model_card import NAME as CARD_NAME

from ._attach_common import assert_same_state, state_snapshot
from ._models import padded_batch, tiny_model

CONFIGS = [ReftConfig(method="loreft", rank=4, positions="f2+l2", share_weights=False, layers=[0, 2]),
           ReftConfig(method="noreft", rank=2, positions="l3", add_bias=False, act="gelu"),
           REDConfig(layers=[1])]


def _trained(arch="llama", configs=CONFIGS, seed=0):
    model = tiny_model(arch, seed=seed)
    get_reft_model(model, configs, verbose=False)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _logits(model, seed=1):
    ids, mask = padded_batch([6, 9], 9, "left", seed=seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits




@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_round_trip_into_a_fresh_model_is_exact(tmp_path, arch):
    configs = CONFIGS if arch != "bert" else [ReftConfig(rank=2, positions="f1"), REDConfig()]
    trained = _trained(arch, configs)
    save_interventions(trained, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])  # no temporary files left
    fresh = tiny_model(arch)  # same base weights (same seed), no interventions yet
    load_interventions(fresh, tmp_path)
    assert [c.to_dict() for c in fresh.reft.configs] == [c.to_dict() for c in configs]
    for (k, a), (k2, b) in zip(trained.reft_interventions.state_dict().items(),
                               fresh.reft_interventions.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert torch.equal(_logits(trained), _logits(fresh))
    assert not torch.equal(_logits(fresh), _logits(tiny_model(arch)))  # the loaded edit does something


def test_load_into_an_attached_model_overwrites_its_parameters(tmp_path):
    trained = _trained()
    save_interventions(trained, tmp_path)
    other = tiny_model("llama")
    get_reft_model(other, CONFIGS, verbose=False)
    assert not torch.equal(_logits(trained), _logits(other))
    load_interventions(other, tmp_path)
    assert torch.equal(_logits(trained), _logits(other))


def test_bf16_model_keeps_fp32_rotation_through_save_and_load(tmp_path):
    model = tiny_model("llama")
    get_reft_model(model, ReftConfig(rank=4, positions="f2+l2"), verbose=False)
    model.to(torch.bfloat16)
    save_interventions(model, tmp_path)
    fresh = tiny_model("llama").to(torch.bfloat16)
    load_interventions(fresh, tmp_path)
    iv = fresh.reft_interventions[0]["layer0"]
    assert iv.rotation.dtype == torch.float32 and iv.weight.dtype == torch.bfloat16
    assert torch.equal(iv.rotation, model.reft_interventions[0]["layer0"].rotation)


def _damage(folder, how):
    cpath, wpath = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if how == "truncated weights":
        data = open(wpath, "rb").read()
        open(wpath, "wb").write(data[: len(data) // 2])
    elif how == "flipped byte":
        data = bytearray(open(wpath, "rb").read())
        data[-5] ^= 0xFF
        open(wpath, "wb").write(bytes(data))
    elif how == "missing weights":
        os.unlink(wpath)
    elif how == "missing config":
        os.unlink(cpath)
    elif how == "bad json":
        open(cpath, "w").write("{not json")
    elif how == "truncated json":
        text = open(cpath).read()
        open(cpath, "w").write(text[: len(text) // 2])
    elif how == "other format version":
        meta = json.load(open(cpath))
        meta["format_version"] = 99
        json.dump(meta, open(cpath, "w"))
    elif how == "unknown method":
        meta = json.load(open(cpath))
        meta["configs"][0]["method"] = "lora"
        json.dump(meta, open(cpath, "w"))
    else:
        raise AssertionError(how)


DAMAGE = ["truncated weights", "flipped byte", "missing weights", "missing config", "bad json",
          "truncated json", "other format version", "unknown method"]


@pytest.mark.parametrize("attached", [False, True], ids=["fresh", "attached"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_folder_raises_and_leaves_the_model_untouched(tmp_path, how, attached):
    save_interventions(_trained(), tmp_path)
    _damage(tmp_path, how)
    model = tiny_model("llama")
    if attached:
        get_reft_model(model, CONFIGS, verbose=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError):
        load_interventions(model, tmp_path)
    assert_same_state(before, state_snapshot(model))


@pytest.mark.parametrize("mismatch", ["hidden size", "layer count", "model type", "configs"])
def test_mismatched_model_raises_and_leaves_it_untouched(tmp_path, mismatch):
    trained = _trained(configs=[ReftConfig(rank=2, positions="f2+l2"), REDConfig()])
    save_interventions(trained, tmp_path)
    if mismatch == "hidden size":
        from ._models import tiny_config, transformers
        cfg = tiny_config("llama")
        cfg.hidden_size, cfg.intermediate_size = 48, 96
        model = transformers.LlamaForCausalLM(cfg).eval()
    elif mismatch == "layer count":
        model = tiny_model("llama", n_layers=4)
    elif mismatch == "model type":
        model = tiny_model("mistral")
    else:
        model = tiny_model("llama")
        get_reft_model(model, [ReftConfig(rank=2, positions="f1+l1"), REDConfig()], verbose=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="saved|other configs"):
        load_interventions(model, tmp_path)
    assert_same_state(before, state_snapshot(model))


def test_save_needs_interventions(tmp_path):
    with pytest.raises(ValueError, match="no interventions attached"):
        save_interventions(tiny_model("llama"), tmp_path)


def test_saving_over_an_old_save_replaces_it(tmp_path):
    first = _trained(seed=0)
    save_interventions(first, tmp_path)
    second = _trained(seed=0)
    with torch.no_grad():
        for p in second.reft_interventions.parameters():
            p.mul_(0.5)
    save_interventions(second, tmp_path)
    fresh = tiny_model("llama")
    load_interventions(fresh, tmp_path)
    assert torch.equal(_logits(fresh), _logits(second))
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])


@pytest.mark.parametrize("attached", [False, True], ids=["fresh", "attached"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "inf"])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, bad, attached):
    trained = _trained()
    name = next(k for k in trained.reft_interventions.state_dict() if k.endswith("weight"))
    with torch.no_grad():
        trained.reft_interventions.state_dict()[name].view(-1)[2] = bad
    save_interventions(trained, tmp_path)
    model = tiny_model("llama")
    if attached:
        get_reft_model(model, CONFIGS, verbose=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=f"{name}: the tensor saved in .* holds 1 NaN or Inf value"):
        load_interventions(model, tmp_path)
    assert_same_state(before, state_snapshot(model))
    load_interventions(model, tmp_path, allow_nonfinite=True)
    for (k, a), (_, b) in zip(trained.reft_interventions.state_dict().items(),
                              model.reft_interventions.state_dict().items()):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), k
    with pytest.raises(TypeError, match="allow_nonfinite must be a bool"):
        load_interventions(model, tmp_path, allow_nonfinite="yes")
