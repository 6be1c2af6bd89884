"""The positions helper against a plain per-example loop written here from the ReFT paper's
convention, on random left- and right-padded batches."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import intervention_locations, locations_to_rows, parse_positions


def _loop_reference(mask, spec, prompt_lengths, share):
    """One example at a time, in Python: the convention of reft_kernels/hf/positions.py (each
    side's k capped at what the padded width allows: S // 2 per side with both, S with one)."""
    first, last = (None, None) if spec == "all" else spec
    if spec != "all":
        most = mask.shape[1] // 2 if (first and last) else mask.shape[1]
        first, last = min(first, most), min(last, most)
    out = []
    for b in range(mask.shape[0]):
        real = [i for i in range(mask.shape[1]) if mask[b, i]]
        n = len(real) if prompt_lengths is None else max(0, min(int(prompt_lengths[b]), len(real)))
        prompt = real[:n]
        if spec == "all":
            out.append(prompt + [-1] * (mask.shape[1] - n))
            continue
        cap = n // 2 if (spec[0] and spec[1]) else n
        nf, nl = min(first, cap), min(last, cap)
        f = prompt[:nf] + [-1] * (first - nf)
        lst = (prompt[n - nl:] if nl else []) + [-1] * (last - nl)
        if share:
            out.append(f + lst)
        else:
            w = max(first, last)
            out.append([f + [-1] * (w - first), lst + [-1] * (w - last)])
    bsz, seq = mask.shape
    if spec == "all":
        shape = (bsz, seq)
    else:
        shape = (bsz, first + last) if share else (bsz, 2, max(first, last))
    return torch.tensor(out, dtype=torch.long).reshape(shape)


def _batch(bsz, seq, side, gen):
    lengths = torch.randint(0, seq + 1, (bsz,), generator=gen)
    j = torch.arange(seq)
    if side == "right":
        mask = (j[None, :] < lengths[:, None]).long()
    elif side == "left":
        mask = (j[None, :] >= seq - lengths[:, None]).long()
    else:  # holes anywhere: the helper only counts real tokens
        mask = (torch.rand(bsz, seq, generator=gen) < 0.7).long()
    return mask


@pytest.mark.parametrize("side", ["left", "right", "scattered"])
@pytest.mark.parametrize("positions", ["f7+l7", "f1+l1", "f3+l5", "f2", "l4", "all"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("with_prompt_lengths", [False, True])
def test_matches_per_example_loop(side, positions, share, with_prompt_lengths):
    gen = torch.Generator().manual_seed(hash((side, positions, share)) % 2**31)
    for seq in (0, 1, 5, 16):
        mask = _batch(6, seq, side, gen)
        prompt_lengths = torch.randint(0, seq + 2, (6,), generator=gen) if with_prompt_lengths else None
        got = intervention_locations(mask, positions, prompt_lengths, share_weights=share)
        want = _loop_reference(mask, parse_positions(positions), prompt_lengths, share)
        assert got.dtype == torch.long and torch.equal(got, want), (seq, mask, got, want)


def test_paper_convention_example():
    """A prompt of 10 tokens, left-padded by 3: f3+l3 picks positions 3,4,5 and 10,11,12 (the last
    prompt token included); a prompt of 4 caps each side at 2."""
    mask = torch.tensor([[0, 0, 0] + [1] * 10, [1] * 4 + [0] * 9])
    loc = intervention_locations(mask, "f3+l3")
    assert loc.tolist() == [[3, 4, 5, 10, 11, 12], [0, 1, -1, 2, 3, -1]]
    # pyreft's bundled datasets leave out the final prompt token: prompt_lengths - 1
    loc = intervention_locations(mask, "l2", torch.tensor([9, 3]))
    assert loc.tolist() == [[10, 11], [1, 2]]


def test_rows_index_the_flat_hidden_state():
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    loc = intervention_locations(mask, "f1+l1")
    assert locations_to_rows(loc, 5).tolist() == [0, 3, 6, 9]
    loc2 = intervention_locations(mask, "f1+l1", share_weights=False)
    assert locations_to_rows(loc2, 5).tolist() == [[0, 6], [3, 9]]
    h = torch.randn(2, 5, 8)
    rows = locations_to_rows(loc, 5)
    assert torch.equal(h.reshape(-1, 8)[rows], h[torch.tensor([0, 0, 1, 1]), loc.reshape(-1)])


@pytest.mark.parametrize("bad,exc", [("f7l7", ValueError), ("x3", ValueError), ("f0", ValueError), ("", ValueError),
                                     ("f+l3", ValueError), (7, TypeError)])
def test_bad_position_specs(bad, exc):
    with pytest.raises(exc, match="positions"):
        parse_positions(bad)


def test_bad_masks():
    with pytest.raises(ValueError, match="attention_mask"):
        intervention_locations(torch.ones(5, dtype=torch.long), "f1")
    with pytest.raises(ValueError, match="prompt_lengths"):
        intervention_locations(torch.ones(2, 5), "f1", torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="prompt_lengths"):
        intervention_locations(torch.ones(2, 5), "f1", torch.ones(2))


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_huge_k_costs_what_the_sequence_costs(share):
    """k far beyond the sequence: the locations are those of k capped at what 6 tokens hold
    (3 per side with both sides, 6 with one), built at that size, not at k's."""
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    for huge, capped in [("f1000000+l1000000", "f3+l3"), ("l1000000", "l6"), ("f1000000", "f6")]:
        got = intervention_locations(mask, huge, share_weights=share)
        want = _loop_reference(mask, parse_positions(capped), None, share)
        assert torch.equal(got, want), (huge, got, want)
    both = intervention_locations(mask, "f1000000+l1000000", share_weights=share)
    assert tuple(both.shape) == ((2, 6) if share else (2, 2, 3))
    assert both.tolist() == ([[0, 1, 2, 3, 4, 5], [2, 3, -1, 4, 5, -1]] if share
                             else [[[0, 1, 2], [3, 4, 5]], [[2, 3, -1], [4, 5, -1]]])


def test_huge_k_forward_equals_capped_forward():
    """A 2 x 6-token forward with positions="f1000000+l1000000": the rows handed to the layers
    number B * P = 12 (not 4 million) and the logits are exactly those of "f3+l3"."""
    from reft_kernels.hf import ReftConfig, get_reft_model
    from reft_kernels.hf.batch import build_batch

    from ._models import padded_batch, tiny_model

    ids, mask = padded_batch([6, 4], 6, "left", seed=3)
    models, logits = [], []
    for positions in ("f1000000+l1000000", "f3+l3"):
        cfg = ReftConfig(method="loreft", rank=2, layers=[0, 1], positions=positions)
        rows = build_batch([cfg], 2, 6, mask, None, False, torch.device("cpu")).rows[0]
        assert [tuple(r.shape) for r in rows] == [(12,)], positions
        model = tiny_model("llama")
        get_reft_model(model, cfg, verbose=False)
        if models:
            model.reft_interventions.load_state_dict(models[0].reft_interventions.state_dict())
        else:
            with torch.no_grad():
                for p in model.reft_interventions.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
        models.append(model)
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        base = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], base)  # the edit does something
