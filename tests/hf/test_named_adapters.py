"""Named adapters (``reft_kernels/hf/adapters.py``): several sets of interventions on one model,
switched without rebuilding it. Each check compares the switched model against a fresh model that
carries one adapter only, with the same parameter values, so a switch that left a hook, a module
or a flag of the other adapter behind would show."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, load_interventions, save_interventions

from ._attach_common import randomize_, snapshot
from ._models import padded_batch, tiny_model

LOREFT = ReftConfig(method="loreft", rank=3, positions="f2+l2", layers=[0, 1])
RED = REDConfig(layers=[1, 2])
NOREFT = ReftConfig(method="noreft", rank=2, positions="l3", layers=[2])


def _batch():
    return padded_batch([9, 12], 12, "left", seed=3)


def _logits(model, **kw):
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _single(config, groups):
    """A fresh model carrying ``config`` alone, its interventions set to ``groups``' values."""
    model = tiny_model("llama", n_layers=3)
    get_reft_model(model, config, verbose=False)
    model.reft_interventions.load_state_dict(groups.state_dict())
    return model


def _two_adapters():
    model = tiny_model("llama", n_layers=3)
    get_reft_model(model, LOREFT, verbose=False)
    randomize_(model.reft_interventions, seed=1)
    model.reft.add_adapter("style", [RED, NOREFT])
    randomize_(model.reft_adapters["style"], seed=2)
    return model


def test_switching_gives_each_adapter_alone():
    model = _two_adapters()
    handle = model.reft
    assert handle.active_adapter == "default" and handle.adapter_names == ("default", "style")
    first, second = model.reft_interventions, model.reft_adapters["style"]
    base = _logits(tiny_model("llama", n_layers=3))
    want_first = _logits(_single(LOREFT, first))
    want_second = _logits(_single([RED, NOREFT], second))
    assert not torch.allclose(want_first, want_second, atol=1e-3)
    assert not torch.allclose(want_first, base, atol=1e-3) and not torch.allclose(want_second, base, atol=1e-3)

    torch.testing.assert_close(_logits(model), want_first, rtol=0, atol=0)
    assert model.reft.set_adapter("style") is model
    assert handle.active_adapter == "style" and handle.adapter_names == ("style", "default")
    assert model.reft_interventions is second and model.reft_adapters["default"] is first  # moved, not rebuilt
    assert handle.configs == (RED, NOREFT)
    torch.testing.assert_close(_logits(model), want_second, rtol=0, atol=0)
    model.reft.set_adapter("default")
    assert model.reft_interventions is first
    torch.testing.assert_close(_logits(model), want_first, rtol=0, atol=0)


def test_only_the_active_adapter_trains():
    model = _two_adapters()
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() and all(n.startswith("reft_interventions.") for n in trainable())
    assert not any(p.requires_grad for p in model.reft_adapters["style"].parameters())
    # a flag set by hand survives a round trip through the inactive store
    frozen = next(iter(model.reft_interventions.parameters()))
    frozen.requires_grad_(False)
    model.reft.set_adapter("style")
    assert trainable() and all(n.startswith("reft_interventions.") for n in trainable())
    assert not any(p.requires_grad for p in model.reft_adapters["default"].parameters())
    ids, mask = _batch()
    labels = ids.masked_fill(torch.arange(12) < 8, -100)  # the prompt: the first 8 columns
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.reft_adapters["default"].parameters())
    assert all(p.grad is not None for p in model.reft_interventions.parameters())
    model.reft.set_adapter("default")
    assert frozen.requires_grad is False
    assert sum(p.requires_grad for p in model.reft_interventions.parameters()) == \
        len(list(model.reft_interventions.parameters())) - 1


def test_disabled_by_name():
    model = _two_adapters()
    base, edited = _logits(tiny_model("llama", n_layers=3)), _logits(model)
    with model.reft.disabled("default"):
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    with model.reft.disabled("style"):  # inactive: nothing to disable
        torch.testing.assert_close(_logits(model), edited, rtol=0, atol=0)
    with model.reft.disabled():
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        with model.reft.disabled("other"):
            pass


def test_delete_and_errors_leave_the_model_as_it_was():
    model = _two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="exists already"):
        model.reft.add_adapter("style", RED)
    with pytest.raises(ValueError, match="letters, digits"):
        model.reft.add_adapter("a.b", RED)
    with pytest.raises(TypeError, match="adapter_name must be a str"):
        model.reft.add_adapter(3, RED)
    with pytest.raises(ValueError, match="layers"):
        model.reft.add_adapter("deep", REDConfig(layers=[7]))
    with pytest.raises(TypeError):
        model.reft.add_adapter("bad", "not a config")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.reft.set_adapter("nope")
    with pytest.raises(ValueError, match="is the active adapter"):
        model.reft.delete_adapter("default")
    assert snapshot(model) == before and model.reft.adapter_names == ("default", "style")
    model.reft.delete_adapter("style")
    assert model.reft.adapter_names == ("default",) and not hasattr(model, "reft_adapters")
    assert not any("reft_adapters" in k for k in model.state_dict())


def test_remove_detaches_every_adapter():
    model = tiny_model("llama", n_layers=3)
    before = snapshot(model)
    get_reft_model(model, LOREFT, verbose=False, adapter_name="first")
    model.reft.add_adapter("second", RED)
    model.reft.set_adapter("second")
    model.reft.remove()
    assert snapshot(model) == before


def test_save_and_load_by_name(tmp_path):
    model = _two_adapters()
    want_first = _logits(model)
    model.reft.set_adapter("style")
    want_second = _logits(model)
    model.reft.set_adapter("default")
    save_interventions(model, tmp_path / "style", adapter_name="style")  # inactive: saved by name
    save_interventions(model, tmp_path / "first")
    model.save_pretrained(tmp_path / "pretrained")  # the active adapter
    assert (tmp_path / "pretrained" / "reft_config.json").read_text() == \
        (tmp_path / "first" / "reft_config.json").read_text()

    fresh = tiny_model("llama", n_layers=3)
    load_interventions(fresh, tmp_path / "first")
    load_interventions(fresh, tmp_path / "style", adapter_name="style")  # added, inactive (PEFT's load_adapter)
    assert fresh.reft.adapter_names == ("default", "style") and fresh.reft.active_adapter == "default"
    torch.testing.assert_close(_logits(fresh), want_first, rtol=0, atol=0)
    fresh.reft.set_adapter("style")
    torch.testing.assert_close(_logits(fresh), want_second, rtol=0, atol=0)
    # into an existing adapter of other configs: refused, nothing changes
    with pytest.raises(ValueError, match="other configs than the model's adapter 'default'"):
        load_interventions(fresh, tmp_path / "style", adapter_name="default")
    # a load under a new name that fails after adding it (saved for a 4-layer model) adds nothing
    other = tiny_model("llama", n_layers=4)
    get_reft_model(other, NOREFT, verbose=False)
    save_interventions(other, tmp_path / "four_layers")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="num_layers"):
        load_interventions(fresh, tmp_path / "four_layers", adapter_name="third")
    assert fresh.reft.adapter_names == ("style", "default") and snapshot(fresh) == before


def test_a_reft_adapter_added_to_a_red_model_generates():
    """The first adapter is RED only; a ReFT adapter added later must still see its prompt rows
    in generate (the forward and generate wrappers do not depend on the first adapter)."""
    model = tiny_model("llama", n_layers=3)
    get_reft_model(model, RED, verbose=False)
    model.reft.add_adapter("reft", LOREFT)
    randomize_(model.reft_adapters["reft"], seed=5)
    model.reft.set_adapter("reft")
    alone = _single(LOREFT, model.reft_interventions)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(input_ids=ids, **kw)
        want = alone.generate(input_ids=ids, **kw)
        base = tiny_model("llama", n_layers=3).generate(input_ids=ids, **kw)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)
