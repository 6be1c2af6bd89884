"""ReFT on T5's encoder and decoder blocks (``encoder.block.N``, ``decoder.block.N``) against an
unpatched copy with reference hooks written here (gather, edit with ``reft_kernels.reference``,
scatter on each block's hidden states): encoder positions from the encoder's attention mask (or
explicit locations), decoder positions from the decoder's input (its mask, the tokens shifted in
from ``labels``, or every token); ``generate`` with the KV cache against a cache-free greedy loop
whose decoder edits only the decoder prompt."""
from __future__ import annotations

import copy

import pytest
import torch

from reft_kernels.hf import ReftConfig, get_reft_model, intervention_locations

from ._attach_common import compare_with_hooked_reference, freeze_, gather_edit_scatter, randomize_
from ._models import padded_batch, tiny_model

LAYERS = (0, 2)
EOS = 2


def _attach(share=True, positions="f2+l2", seed=1):
    model = tiny_model("t5", dtype=torch.float64)
    ref = freeze_(copy.deepcopy(model))
    get_reft_model(model, ReftConfig(layers=list(LAYERS), rank=4, positions=positions, share_weights=share,
                                     backend="torch"), verbose=False)
    randomize_(model.reft_interventions, std=0.3, seed=seed)
    return model, ref


def _sides(ivs, stack, layer, loc, share):
    if share:
        return [(ivs[f"{stack}{layer}"], loc.reshape(loc.shape[0], -1))]
    return [(ivs[f"{stack}{layer}_first"], loc[:, 0]), (ivs[f"{stack}{layer}_last"], loc[:, 1])]


def _reference_hooks(ref, ivs, enc_loc, dec_loc, share, dec_prompt=None):
    """Hooks on every edited block of ``ref``; ``dec_prompt``: edit only the decoder's first
    ``dec_prompt`` columns (a cache-free generation step)."""
    handles = []
    for stack, loc in (("encoder", enc_loc), ("decoder", dec_loc)):
        for layer in LAYERS:
            sides = _sides(ivs, stack, layer, loc, share)

            def hook(mod, args, out, sides=sides):
                h = out[0]
                if dec_prompt is not None and h.shape[1] > dec_prompt and mod.is_decoder:
                    h = torch.cat([gather_edit_scatter(h[:, :dec_prompt], sides), h[:, dec_prompt:]], dim=1)
                else:
                    h = gather_edit_scatter(h, sides)
                return (h,) + tuple(out[1:])

            handles.append(getattr(ref, stack).block[layer].register_forward_hook(hook))
    return handles


def _check(model, ref, kw, enc_loc, dec_loc, share):
    ivs = model.reft_interventions[0]
    ref_kw = {k: v for k, v in kw.items() if k != "intervention_locations"}
    compare_with_hooked_reference(model, ref, kw, ivs, lambda: _reference_hooks(ref, ivs, enc_loc, dec_loc, share),
                                  ref_kw)


def test_site_keys_name_the_stack():
    model, _ = _attach(share=False)
    assert sorted(model.reft_interventions[0]) == sorted(
        f"{s}{x}_{side}" for s in ("encoder", "decoder") for x in LAYERS for side in ("first", "last"))


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_with_decoder_inputs(share, side):
    model, ref = _attach(share)
    ids, mask = padded_batch((7, 5, 3), 7, side)
    dec, dec_mask = padded_batch((5, 5, 2), 5, "right", seed=4)
    kw = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    _check(model, ref, kw, intervention_locations(mask, "f2+l2", share_weights=share),
           intervention_locations(dec_mask, "f2+l2", share_weights=share), share)


def test_forward_without_decoder_mask_edits_every_decoder_token_by_the_rule():
    model, ref = _attach()
    ids, mask = padded_batch((7, 4), 7, "right")
    dec = padded_batch((6, 6), 6, "right", seed=5)[0]
    kw = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    _check(model, ref, kw, intervention_locations(mask, "f2+l2"),
           intervention_locations(torch.ones(2, 6, dtype=torch.long), "f2+l2"), True)


def test_forward_with_labels_takes_decoder_positions_from_the_shifted_labels():
    model, ref = _attach()
    ids, mask = padded_batch((7, 4), 7, "right")
    labels = padded_batch((6, 3), 6, "right", seed=6)[0]
    labels[1, 3:] = -100
    # T5's decoder input: the start token, then the labels shifted right
    dec_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    kw = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    _check(model, ref, kw, intervention_locations(mask, "f2+l2"), intervention_locations(dec_mask, "f2+l2"), True)


def test_explicit_locations_are_encoder_positions():
    model, ref = _attach()
    ids, mask = padded_batch((7, 5), 7, "right")
    dec = padded_batch((4, 4), 4, "right", seed=5)[0]
    enc_loc = torch.tensor([[0, 3, 6], [1, -1, 4]])
    kw = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "intervention_locations": enc_loc}
    _check(model, ref, kw, enc_loc, intervention_locations(torch.ones(2, 4, dtype=torch.long), "f2+l2"), True)


def _reference_greedy(model, ids, mask, dec_prompt, new):
    base = freeze_(tiny_model("t5", dtype=torch.float64))
    ivs = model.reft_interventions[0]
    enc_loc = intervention_locations(mask, "f2+l2")
    width = dec_prompt.shape[1]
    dec_loc = intervention_locations(torch.ones(dec_prompt.shape, dtype=torch.long), "f2+l2")
    seq = dec_prompt
    handles = _reference_hooks(base, ivs, enc_loc, dec_loc, True, dec_prompt=width)
    try:
        with torch.no_grad():
            for _ in range(new):
                logits = base(input_ids=ids, attention_mask=mask, decoder_input_ids=seq, use_cache=False).logits
                logits = logits[:, -1].clone()
                logits[:, EOS] = -float("inf")
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return seq[:, width:]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generate_matches_reference_loop(use_cache):
    model, _ = _attach()
    ids, mask = padded_batch((7, 5, 3), 7, "right", seed=7)
    dec_prompt = torch.cat([torch.zeros(3, 1, dtype=torch.long), padded_batch((3, 3, 3), 3, "right", seed=8)[0]], 1)
    out = model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_prompt, max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, use_cache=use_cache)
    got = out[:, dec_prompt.shape[1]:]
    assert got.shape == (3, 4)
    assert torch.equal(got, _reference_greedy(model, ids, mask, dec_prompt, 4))
    with model.reft.disabled():
        base = model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_prompt, max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, use_cache=use_cache)
    assert not torch.equal(out, base), "the interventions should change the generation"


def test_generate_passes_explicit_locations_to_the_encoder():
    model, _ = _attach()
    ids, mask = padded_batch((7, 5), 7, "right", seed=7)
    loc = intervention_locations(mask, "f2+l2")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    default = model.generate(**kw)
    assert torch.equal(model.generate(**kw, intervention_locations=loc), default)
    other = model.generate(**kw, intervention_locations=torch.tensor([[5, 6, -1, -1], [-1, -1, -1, -1]]))
    assert not torch.equal(other, default)
