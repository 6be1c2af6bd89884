"""load_pyreft: folders in pyreft 0.1.0's save format (pyvene's ``config.json`` + ``intkey_<key>.bin``),
written here without pyreft or pyvene, load into a tiny model whose logits then match a reference
that applies pyreft's formulas (float64, from the saved tensors) at the same positions through
plain forward hooks; every bad folder raises ValueError and leaves the model exactly as it was."""
from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
from torch import nn

from reft_kernels.hf import ReftConfig, get_reft_model, intervention_locations
from reft_kernels.hf.pyreft_import import load_pyreft

from ._attach_common import assert_same_state, state_snapshot
from ._models import D, layers_of, padded_batch, tiny_model

CLASSES = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention", "direft": "DireftIntervention",
           "nodireft": "NodireftIntervention", "consreft": "ConsreftIntervention",
           "lobireft": "LobireftIntervention"}
METHODS = tuple(CLASSES)
RANK = 3
LAYERS = (0, 2)
POSITIONS = "f2+l3"
ORIG = "rotate_layer.parametrizations.weight.original"
BASE = "rotate_layer.parametrizations.weight.0.base"


# ----------------------------------------------------------------------------- fixtures in pyreft's format

def pyvene_key(layer, k, style):
    if style == "0.1.6":
        return f"layer.{layer}.comp.block_output.unit.pos.nunit.1#{k}"
    return f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{k}"


class _LowRankRotate(nn.Module):
    """Holds a (d, r) ``weight`` with orthonormal columns, as pyreft's LowRankRotateLayer."""

    def __init__(self, d, r, g):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
        self.weight = nn.Parameter(q)


def _trained_rotation(d, r, g):
    """A ``parametrizations.orthogonal`` rotate layer as pyreft builds it, then moved away from its
    initial point as training would: the strictly lower part of ``original`` changed, its diagonal
    left at magnitude >= 1 (torch reads it through ``.int()``)."""
    rot = nn.utils.parametrizations.orthogonal(_LowRankRotate(d, r, g))
    with torch.no_grad():
        orig = rot.parametrizations.weight.original
        orig.add_(torch.randn(orig.shape, generator=g).tril(-1) * 0.3)
        orig.diagonal().mul_(1.0 + 0.05 * torch.rand(r, generator=g))
    return rot


def pyreft_state(method, d=D, r=RANK, *, seed=0, add_bias=True, dtype=torch.float32):
    """The state dict that ``intervention.state_dict()`` of pyreft's class gives, trained values."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.4: (torch.randn(*shape, generator=g) * s).to(dtype)  # noqa: E731
    buffers = {"embed_dim": torch.tensor(d), "interchange_dim": torch.tensor(d)}
    if method == "loreft":  # LoreftIntervention.state_dict: learned_source's items + the rotation
        return {"weight": rnd(r, d), "bias": rnd(r, s=1.0),
                "rotate_layer": _trained_rotation(d, r, g).weight.detach().clone()}
    state = dict(buffers)
    if method in ("direft", "consreft", "lobireft"):
        state.update({f"rotate_layer.{k}": v.clone() for k, v in _trained_rotation(d, r, g).state_dict().items()})
    if method in ("noreft", "nodireft"):
        state["proj_layer.weight"] = rnd(r, d)
        if add_bias:
            state["proj_layer.bias"] = rnd(r, s=1.0)
    if method in ("consreft", "lobireft"):
        state["learned_source"] = torch.rand(r, generator=g) * 2.0 - 0.5
    else:
        state["learned_source.weight"] = rnd(r, d)
        state["learned_source.bias"] = rnd(r, s=1.0)
    return state


def write_pyreft_dir(path, method, *, style="0.1.8", share=True, layers=LAYERS, states=None, d=D, r=RANK,
                     seed=0, add_bias=True, type_name=None, component="block_output"):
    """A folder as ``ReftModel.save`` writes it; returns {(layer, k): state dict}. pyreft's scripts
    list the layers twice for unshared weights (first-position interventions first)."""
    os.makedirs(path, exist_ok=True)
    sites = [(layer, 0) for layer in layers] + ([] if share else [(layer, 1) for layer in layers])
    if states is None:
        states = {site: pyreft_state(method, d, r, seed=seed + 10 * i, add_bias=add_bias)
                  for i, site in enumerate(sites)}
    keys = []
    for layer, k in sites:
        key = pyvene_key(layer, k, style).replace("block_output", component)
        keys.append(key)
        torch.save(states[(layer, k)], os.path.join(path, f"intkey_{key}.bin"))
    n = len(sites)
    cls = type_name or f"<class 'pyreft.interventions.{CLASSES[method]}'>"
    config = {  # what PretrainedConfig.save_pretrained keeps of pyvene's IntervenableConfig
        "intervention_constant_sources": [True] * n,
        "intervention_dimensions": [d] * n,
        "intervention_types": [cls] * n,
        "mode": "parallel",
        # RepresentationConfig namedtuples become JSON lists (pyvene 0.1.8's 14 fields)
        "representations": [[layer, component, "pos", 1, r] + [None] * 9 for layer, _ in sites],
        "sorted_keys": keys,
        "transformers_version": "4.45.1",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return states


# ----------------------------------------------------------------------------- reference (pyreft's math)

def householder_weight(original, base):
    """torch's ``orthogonal`` (Householder, trivialized) weight from its saved tensors, in float64,
    written out: ``base @ (householder_product(tril(X, -1), tau) * diag(X).int())``."""
    X = original.double()
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=0))
    Q = torch.linalg.householder_product(A, tau) * X.diagonal().int().unsqueeze(0)
    return base.double() @ Q


def pyreft_U(method, state):
    if method == "loreft":
        return state["rotate_layer"].double()
    if ORIG in state:
        return householder_weight(state[ORIG], state[BASE])
    return None


_ACTS = {None: lambda x: x, "gelu": torch.nn.functional.gelu, "relu": torch.relu}


def pyreft_edit(method, state, h, act=None):
    """pyreft's forward on rows ``h`` (n, d), in float64 (pyreft's ``x @ M`` row form)."""
    f = _ACTS[act]
    s = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    U = pyreft_U(method, state)
    if method == "loreft":
        return h + (f(h @ s["weight"].T + s["bias"]) - h @ U) @ U.T
    if method == "noreft":
        W2 = s["proj_layer.weight"]
        proj = h @ W2.T + (s["proj_layer.bias"] if "proj_layer.bias" in s else 0.0)
        return h + (f(h @ s["learned_source.weight"].T + s["learned_source.bias"]) - proj) @ W2
    if method == "direft":
        return h + f(h @ s["learned_source.weight"].T + s["learned_source.bias"]) @ U.T
    if method == "nodireft":
        return h + f(h @ s["learned_source.weight"].T + s["learned_source.bias"]) @ s["proj_layer.weight"]
    if method == "consreft":
        return h + (s["learned_source"] - h @ U) @ U.T
    if method == "lobireft":
        return h + (s["learned_source"] @ U.T).expand_as(h)
    raise ValueError(method)


def reference_logits(method, states, ids, mask, share, positions=POSITIONS, act=None):
    """The base model with forward hooks applying pyreft's edits at ``positions``."""
    model = tiny_model("llama")
    loc = intervention_locations(mask, positions, share_weights=share)
    sides = {0: loc} if share else {0: loc[:, 0], 1: loc[:, 1]}
    layers = sorted({layer for layer, _ in states})
    for layer in layers:
        def hook(module, args, out, layer=layer):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            for k, where in sides.items():
                b_idx, p_idx = (where >= 0).nonzero(as_tuple=True)
                pos = where[b_idx, p_idx]
                h[b_idx, pos] = pyreft_edit(method, states[(layer, k)], h[b_idx, pos].double(), act).to(h.dtype)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        layers_of(model)[layer].register_forward_hook(hook)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _batch(side="left"):
    return padded_batch([6, 9, 4], 9, side, seed=3)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _check(tmp_path, method, *, style="0.1.8", share=True, act=None, side="left", add_bias=True,
           share_arg=None):
    states = write_pyreft_dir(tmp_path, method, style=style, share=share, add_bias=add_bias)
    ids, mask = _batch(side)
    model = tiny_model("llama")
    base = _logits(model, ids, mask)
    assert load_pyreft(model, tmp_path, positions=POSITIONS, act=act, share_weights=share_arg) is model
    cfg = model.reft.configs[0]
    assert (cfg.method, cfg.rank, cfg.layers, cfg.share_weights) == (method, RANK, LAYERS, share)
    ours = _logits(model, ids, mask)
    ref = reference_logits(method, states, ids, mask, share, act=act)
    assert (ref - base).abs().max() > 1e-2  # the edit matters
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    return model, states


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("style", ["0.1.6", "0.1.8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_pyreft_formulas(tmp_path, method, style, share):
    _check(tmp_path, method, style=style, share=share)


@pytest.mark.parametrize("method", ["loreft", "noreft", "direft", "nodireft"])
def test_activation_and_right_padding(tmp_path, method):
    _check(tmp_path, method, act="gelu", side="right", share=False)


@pytest.mark.parametrize("method", ["noreft", "nodireft"])
def test_projection_without_bias(tmp_path, method):
    model, _ = _check(tmp_path, method, add_bias=False)
    iv = model.reft_interventions[0]["layer0"]
    if method == "noreft":
        assert model.reft.configs[0].add_bias is False and iv.proj_bias is None


def test_passing_share_weights_that_agrees_with_the_files(tmp_path):
    _check(tmp_path / "a", "loreft", share=True, share_arg=True)
    _check(tmp_path / "b", "direft", share=False, share_arg=False)


def test_parameters_are_loaded_exactly(tmp_path):
    """Each parameter is the saved tensor (bf16-saved weights upcast exactly), R is U^T to fp32
    rounding, and the rebuilt U matches what the parametrized module itself gives."""
    states = write_pyreft_dir(tmp_path / "lo", "loreft",
                              states={(0, 0): {k: (v.bfloat16() if k != "rotate_layer" else v)
                                               for k, v in pyreft_state("loreft").items()}},
                              layers=(0,))
    model = load_pyreft(tiny_model("llama"), tmp_path / "lo")
    iv, s = model.reft_interventions[0]["layer0"], states[(0, 0)]
    assert iv.weight.dtype == torch.float32 and torch.equal(iv.weight, s["weight"].float())
    assert torch.equal(iv.bias, s["bias"].float())
    torch.testing.assert_close(iv.R.double(), s["rotate_layer"].double().T, atol=1e-6, rtol=0)

    states = write_pyreft_dir(tmp_path / "no", "noreft", layers=(1,))
    model = load_pyreft(tiny_model("llama"), tmp_path / "no")
    iv, s = model.reft_interventions[0]["layer1"], states[(1, 0)]
    for ours, theirs in [("weight", "learned_source.weight"), ("bias", "learned_source.bias"),
                         ("proj_weight", "proj_layer.weight"), ("proj_bias", "proj_layer.bias")]:
        assert torch.equal(getattr(iv, ours), s[theirs]), ours

    g = torch.Generator().manual_seed(5)
    rot = _trained_rotation(D, RANK, g)
    torch.testing.assert_close(householder_weight(rot.parametrizations.weight.original,
                                                  rot.parametrizations.weight[0].base).float(), rot.weight)


def test_infers_unshared_weights_and_passes_dropout(tmp_path):
    write_pyreft_dir(tmp_path, "lobireft", share=False, style="0.1.6")
    model = load_pyreft(tiny_model("llama"), tmp_path, positions="f1+l1", dropout=0.1)
    assert sorted(model.reft_interventions[0]) == ["layer0_first", "layer0_last", "layer2_first", "layer2_last"]
    assert model.reft.configs[0].dropout == 0.1 and model.reft.configs[0].positions == "f1+l1"
    model.reft.remove()
    assert not hasattr(model, "reft_interventions")


def test_loading_draws_no_extra_random_numbers(tmp_path):
    """Rebuilding U registers torch's parametrization, which draws from the global RNG: that must
    not show (only get_reft_model's own initialisation draws)."""
    write_pyreft_dir(tmp_path, "direft")
    a, b = tiny_model("llama"), tiny_model("llama")
    state = torch.random.get_rng_state()
    load_pyreft(a, tmp_path)
    after_load = torch.rand(4)
    torch.random.set_rng_state(state)
    get_reft_model(b, ReftConfig(method="direft", layers=list(LAYERS), rank=RANK), verbose=False)
    assert torch.equal(torch.rand(4), after_load)


# ----------------------------------------------------------------------------- errors leave the model as it was

def _fails(model, directory, match, **kwargs):
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_pyreft(model, directory, **kwargs)
    assert_same_state(before, state_snapshot(model))
    assert getattr(model, "reft", None) is None


@pytest.fixture
def model():
    return tiny_model("llama")


def test_missing_config(tmp_path, model):
    _fails(model, tmp_path, "config.json is missing")
    _fails(model, tmp_path / "nope", "not a directory")
    (tmp_path / "config.json").write_text("{not json")
    _fails(model, tmp_path, "config.json is not valid JSON")


def test_missing_unreadable_or_non_tensor_file(tmp_path, model):
    write_pyreft_dir(tmp_path, "loreft", share=False)
    victim = tmp_path / f"intkey_{pyvene_key(2, 1, '0.1.8')}.bin"
    os.remove(victim)
    _fails(model, tmp_path, r"intkey_layer_2_comp_block_output_unit_pos_nunit_1#1\.bin is missing")
    victim.write_bytes(b"\x00garbage")
    _fails(model, tmp_path, r"nunit_1#1\.bin is not a readable torch.save")
    torch.save({"weight": datetime.date(2024, 1, 1)}, victim)  # refused by weights_only=True
    _fails(model, tmp_path, r"nunit_1#1\.bin is not a readable torch.save")
    torch.save({"weight": 3}, victim)
    _fails(model, tmp_path, r"nunit_1#1\.bin does not hold a state dict")


def test_unknown_or_mixed_types(tmp_path, model):
    write_pyreft_dir(tmp_path, "loreft", type_name="<class 'pyreft.interventions.MysteryIntervention'>")
    _fails(model, tmp_path, "MysteryIntervention")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intervention_types"] = ["<class 'pyreft.interventions.LoreftIntervention'>",
                                 "<class 'pyreft.interventions.DireftIntervention'>"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _fails(model, tmp_path, "mix types")


def test_type_that_does_not_fit_the_file(tmp_path, model):
    write_pyreft_dir(tmp_path, "direft", type_name="<class 'pyreft.interventions.NodireftIntervention'>")
    _fails(model, tmp_path, r"proj_layer.weight' is missing")
    write_pyreft_dir(tmp_path / "b", "noreft", type_name="<class 'pyreft.interventions.LoreftIntervention'>")
    _fails(model, tmp_path / "b", r"key 'weight' is missing")


def test_wrong_hidden_size(tmp_path, model):
    write_pyreft_dir(tmp_path, "consreft", d=16)
    _fails(model, tmp_path, r"intkey_layer_0_comp_block_output_unit_pos_nunit_1#0\.bin: saved for hidden size 16, "
                            r"but the model's hidden size is 32")


def test_share_weights_that_contradicts_the_files(tmp_path, model):
    write_pyreft_dir(tmp_path / "u", "loreft", share=False)
    _fails(model, tmp_path / "u", r"#1 keys.*share_weights=True", share_weights=True)
    write_pyreft_dir(tmp_path / "s", "loreft", share=True)
    _fails(model, tmp_path / "s", r"no #1 keys.*share_weights=False", share_weights=False)
    with pytest.raises(TypeError):
        load_pyreft(model, tmp_path / "s", share_weights="yes")


def test_layer_outside_the_model(tmp_path, model):
    write_pyreft_dir(tmp_path, "nodireft", layers=(1, 5))
    _fails(model, tmp_path, r"nunit_1#0\.bin: layer 5 does not exist in this model")


def test_other_component_or_unit(tmp_path, model):
    write_pyreft_dir(tmp_path, "loreft", component="mlp_input")  # pyvene has it; ReftConfig has no site
    _fails(model, tmp_path, r"intervention 'layer_0_comp_mlp_input_unit_pos_nunit_1#0' is on component 'mlp_input'")
    write_pyreft_dir(tmp_path / "b", "loreft")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    path_keys = [f"comp_model_layers[{x}]_output_unit_pos_nunit_1#0" for x in LAYERS]  # a module-path component
    cfg["sorted_keys"] = path_keys
    cfg["representations"][0][1] = "model.layers[0].output"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    _fails(model, tmp_path / "b", r"'comp_model_layers\[0\]_output_unit_pos_nunit_1#0' is on component "
                                  r"'model.layers\[0\].output', a module path")
    cfg["sorted_keys"] = [k.replace("unit_pos", "unit_h_pos") for k in (pyvene_key(x, 0, "0.1.8") for x in LAYERS)]
    cfg["representations"][0][1] = "block_output"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    _fails(model, tmp_path / "b", r"unit 'h_pos'")


def test_inconsistent_layout(tmp_path, model):
    states = {(0, 0): pyreft_state("lobireft"), (0, 1): pyreft_state("lobireft", seed=1),
              (2, 0): pyreft_state("lobireft", seed=2)}
    write_pyreft_dir(tmp_path, "lobireft", share=False, states={**states, (2, 1): states[(2, 0)]})
    os.remove(tmp_path / f"intkey_{pyvene_key(2, 1, '0.1.8')}.bin")
    cfg = json.loads((tmp_path / "config.json").read_text())
    for field in ("sorted_keys", "representations", "intervention_types"):
        cfg[field] = cfg[field][:3]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _fails(model, tmp_path, r"layers \[0\] have separate first/last")
    write_pyreft_dir(tmp_path / "r", "loreft", layers=(0, 1),
                     states={(0, 0): pyreft_state("loreft", r=3), (1, 0): pyreft_state("loreft", r=2)})
    _fails(model, tmp_path / "r", r"nunit_1#0\.bin: rank 2, hidden size 32; the other files have rank 3")


def test_rotation_that_is_not_orthonormal(tmp_path, model):
    state = pyreft_state("loreft")
    state["rotate_layer"] = state["rotate_layer"] * 1.5
    write_pyreft_dir(tmp_path, "loreft", layers=(0,), states={(0, 0): state})
    _fails(model, tmp_path, "not orthonormal")
    state = pyreft_state("direft")  # a diagonal entry decayed below 1: torch's .int() zeroes a column
    state[ORIG] = state[ORIG].clone()
    state[ORIG][1, 1] = -0.999
    write_pyreft_dir(tmp_path / "b", "direft", layers=(0,), states={(0, 0): state})
    _fails(model, tmp_path / "b", "not orthonormal")


def test_consreft_has_no_dropout_and_no_activation(tmp_path, model):
    write_pyreft_dir(tmp_path, "consreft")
    _fails(model, tmp_path, "no dropout", dropout=0.1)
    _fails(model, tmp_path, "no activation", act="relu")


def test_failure_after_attaching_is_undone(tmp_path, model, monkeypatch):
    from reft_kernels import modules

    write_pyreft_dir(tmp_path, "loreft")

    def boom(self, R):
        raise ValueError("injected failure while loading R")

    monkeypatch.setattr(modules.LoReFT, "load_R_", boom)
    _fails(model, tmp_path, "injected failure")


def test_model_with_interventions_already(tmp_path, model):
    write_pyreft_dir(tmp_path, "loreft")
    get_reft_model(model, ReftConfig(rank=2, layers=[1]), verbose=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="already has interventions"):
        load_pyreft(model, tmp_path)
    assert_same_state(before, state_snapshot(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, model, bad):
    state = pyreft_state("noreft")
    state["learned_source.weight"] = state["learned_source.weight"].clone()
    state["learned_source.weight"][1, 3] = bad
    write_pyreft_dir(tmp_path, "noreft", layers=(0,), states={(0, 0): state})
    _fails(model, tmp_path, r"'learned_source\.weight' holds 1 NaN or Inf value")
    load_pyreft(model, tmp_path, allow_nonfinite=True)
    iv = model.reft_interventions[0]["layer0"]
    want = state["learned_source.weight"].to(iv.weight.dtype)  # loaded as saved, the bad entry too
    assert torch.equal(torch.isnan(iv.weight), torch.isnan(want))
    assert torch.equal(torch.isinf(iv.weight), torch.isinf(want))
    assert torch.equal(iv.weight[torch.isfinite(want)], want[torch.isfinite(want)])
    # a rotation is checked for orthonormality as well: a non-finite one fails that check
    rot = pyreft_state("loreft")
    rot["rotate_layer"] = rot["rotate_layer"].clone()
    rot["rotate_layer"][0, 0] = bad
    write_pyreft_dir(tmp_path / "rot", "loreft", layers=(0,), states={(0, 0): rot})
    other = tiny_model("llama")
    _fails(other, tmp_path / "rot", r"'rotate_layer' holds 1 NaN or Inf value")
    _fails(other, tmp_path / "rot", "not orthonormal", allow_nonfinite=True)
