"""get_reft_model against references written here from the math: an unpatched copy of the model
with plain forward hooks that gather the edited rows, apply ``reft_kernels.reference``, and
scatter them back (ReFT), or compute ``h * scale + bias`` (RED). Logits and the gradients of every
intervention parameter are compared, float64 + backend torch tightly, float32 + backend triton
(Triton's interpreter on CPU) to 1e-4."""
from __future__ import annotations

import copy

import pytest
import torch

from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, intervention_locations

from ._attach_common import (add_red_reference_hooks, add_reft_reference_hooks, freeze_, gather_edit_scatter,
                             grads_of, randomize_, red_site_names, reft_sides, weighted_sum)
from ._models import ARCHS, REFT_ARCHS, device_for, layers_of, model_inputs, padded_batch, tiny_model

METHODS = ("loreft", "noreft", "direft", "nodireft", "consreft", "lobireft")
# (model dtype, backend, rtol, atol)
PRECISIONS = {"f64-torch": (torch.float64, "torch", 1e-10, 1e-12), "f32-triton": (torch.float32, "triton", 1e-4, 1e-5)}
SEQ = 9
LENGTHS = (9, 6, 4)


def _explicit_locations(share_weights):
    """Hand-chosen positions in the padded input (padding positions and -1 slots included); for
    unshared weights the first and last lists overlap at one position, which is edited by the
    first intervention and then by the last."""
    if share_weights:
        return torch.tensor([[0, 4, 8, -1], [7, -1, 2, 3], [-1, -1, -1, -1]])
    return torch.tensor([[[0, 1, 4], [4, 8, -1]], [[2, -1, 3], [3, 5, 6]], [[-1, -1, -1], [5, -1, -1]]])


def _check_reft_against_reference(arch, method, precision, positions, share, side, explicit, act=None,
                                   layers=(0, 2)):
    dtype, backend, rtol, atol = PRECISIONS[precision]
    dev = device_for(backend)
    model = tiny_model(arch, dtype=dtype).to(dev)
    ref = freeze_(copy.deepcopy(model))
    cfg = ReftConfig(method=method, layers=list(layers), rank=4, positions=positions, share_weights=share,
                     act=act, backend=backend)
    get_reft_model(model, cfg, verbose=False)
    ivs = model.reft_interventions[0]
    assert {iv.backend for iv in ivs.values()} == {backend}
    randomize_(ivs)
    ids, mask = (t.to(dev) for t in padded_batch(LENGTHS, SEQ, side))
    kw = model_inputs(arch, ids, mask)
    if explicit:
        loc = _explicit_locations(share).to(dev)
        got = model(**kw, intervention_locations=loc).logits
    else:
        loc = intervention_locations(mask, positions, share_weights=share)
        got = model(**kw).logits
    weighted_sum(got).backward()
    params = list(ivs.named_parameters())
    got_grads = grads_of(params)

    handles = add_reft_reference_hooks(ref, ivs, layers, loc, share)
    want = ref(**kw).logits
    for h in handles:
        h.remove()
    weighted_sum(want).backward()
    want_grads = grads_of(params)

    base = ref(**kw).logits
    assert not torch.allclose(base, want, rtol=1e-3, atol=0), "the edit should change the logits"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert set(got_grads) == {n for n, _ in params}
    for name in got_grads:
        assert want_grads[name].abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=rtol, atol=atol, msg=name)


# (positions, share_weights, padding side, explicit locations)
LLAMA_CASES = [
    ("f2+l2", True, "left", False),
    ("f2+l2", False, "right", False),
    ("f2+l2", False, "left", True),
    ("l3", True, "right", False),
    ("all", True, "left", False),
    ("f2+l2", True, "right", True),
]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", LLAMA_CASES, ids=lambda c: f"{c[0]}-{'shared' if c[1] else 'unshared'}-{c[2]}"
                         f"-{'explicit' if c[3] else 'mask'}")
def test_reft_llama_every_method_matches_reference(method, precision, case):
    positions, share, side, explicit = case
    _check_reft_against_reference("llama", method, precision, positions, share, side, explicit)


OTHER_CASES = [
    # (method, precision, positions, share, side, explicit, act)
    ("loreft", "f64-torch", "f2+l2", True, "left", False, None),
    ("noreft", "f32-triton", "f2+l2", False, "right", True, None),
    ("direft", "f64-torch", "l3", True, "right", False, "relu"),
    ("consreft", "f32-triton", "all", True, "left", False, None),
    ("nodireft", "f64-torch", "f2+l2", False, "left", False, "tanh"),
    ("lobireft", "f64-torch", "f2+l2", True, "right", True, None),
]


@pytest.mark.parametrize("arch", [a for a in REFT_ARCHS if a != "llama"])
@pytest.mark.parametrize("case", OTHER_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_reft_other_archs_match_reference(arch, case):
    method, precision, positions, share, side, explicit, act = case
    # the classifiers read one token after the last layer: edits there at other positions have no
    # effect (and zero gradient), so they edit layers 0 and 1
    layers = (0, 1) if arch in ("bert", "roberta") else (0, 2)
    _check_reft_against_reference(arch, method, precision, positions, share, side, explicit, act=act, layers=layers)


def test_reft_every_layer_with_activation_matches_reference():
    _check_reft_against_reference("llama", "loreft", "f64-torch", "f2+l2", True, "left", False, act="gelu",
                                  layers=(0, 1, 2))


def test_two_reft_configs_on_one_layer_apply_in_config_order():
    model = tiny_model("llama", dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    cfgs = [ReftConfig(method="loreft", layers=[1], rank=4, positions="f2+l2", backend="torch"),
            ReftConfig(method="direft", layers=[1], rank=4, positions="all", backend="torch")]
    get_reft_model(model, cfgs, verbose=False)
    randomize_(model.reft_interventions)
    ids, mask = padded_batch(LENGTHS, SEQ, "right")
    got = model(input_ids=ids, attention_mask=mask).logits
    sides = (reft_sides(model.reft_interventions[0], 1, intervention_locations(mask, "f2+l2"), True)
             + reft_sides(model.reft_interventions[1], 1, intervention_locations(mask, "all"), True))
    handle = layers_of(ref)[1].register_forward_hook(lambda m, a, out: gather_edit_scatter(out, sides))
    want = ref(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- RED

@pytest.mark.parametrize("arch", ARCHS)
def test_red_at_init_is_bit_identical(arch):
    dev = device_for("triton")
    model = tiny_model(arch).to(dev)
    ids, mask = (t.to(dev) for t in padded_batch(LENGTHS, SEQ, "left"))
    kw = model_inputs(arch, ids, mask)
    with torch.no_grad():
        base_nograd = model(**kw).logits
    base = freeze_(copy.deepcopy(model))(**kw).logits
    get_reft_model(model, [REDConfig(), REDConfig(layers=[1], backend="triton")], verbose=False)
    assert torch.equal(model(**kw).logits, base)
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base_nograd)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_red_matches_reference(arch, precision):
    dtype, backend, rtol, atol = PRECISIONS[precision]
    layers = [0, 1, 2] if precision == "f64-torch" else [0, 2]
    dev = device_for(backend)
    model = tiny_model(arch, dtype=dtype).to(dev)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, REDConfig(layers="all" if len(layers) == 3 else layers, backend=backend), verbose=False)
    ivs = model.reft_interventions[0]
    want_keys = {key for layer in layers for key, _ in red_site_names(arch, layer)}
    assert set(ivs.keys()) == want_keys
    if arch == "t5":
        assert {k[:7] for k in want_keys} == {"encoder", "decoder"}
    randomize_(ivs)
    ids, mask = (t.to(dev) for t in padded_batch(LENGTHS, SEQ, "right"))
    kw = model_inputs(arch, ids, mask)
    got = model(**kw).logits
    weighted_sum(got).backward()
    params = list(ivs.named_parameters())
    got_grads = grads_of(params)

    handles = add_red_reference_hooks(ref, arch, ivs, layers)
    want = ref(**kw).logits
    for h in handles:
        h.remove()
    weighted_sum(want).backward()
    want_grads = grads_of(params)

    assert not torch.allclose(ref(**kw).logits, want, rtol=1e-3, atol=0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for name in got_grads:
        assert want_grads[name].abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------------ RED with ReFT

def test_red_config_before_reft_configs_matches_reference():
    """Each ReftConfig edits its own positions when a REDConfig comes first (the batch's rows are
    listed per ReFT config: once indexed by the position among all configs, an IndexError)."""
    model = tiny_model("llama", dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    cfgs = [REDConfig(layers=[1], backend="torch"),
            ReftConfig(method="loreft", layers=[0], rank=4, positions="f2+l2", backend="torch"),
            ReftConfig(method="consreft", layers=[2], rank=4, positions="l3", backend="torch")]
    get_reft_model(model, cfgs, verbose=False)
    randomize_(model.reft_interventions)
    ids, mask = padded_batch(LENGTHS, SEQ, "left")
    got = model(input_ids=ids, attention_mask=mask).logits
    ivs = model.reft_interventions
    handles = add_red_reference_hooks(ref, "llama", ivs[0], [1])
    handles += add_reft_reference_hooks(ref, ivs[1], [0], intervention_locations(mask, "f2+l2"), True)
    handles += add_reft_reference_hooks(ref, ivs[2], [2], intervention_locations(mask, "l3"), True)
    want = ref(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
