"""The positions helper against a plain per-example loop written here from the ReFT paper's
convention, on random left- and right-padded batches."""
from __future__ import annotations

import pytest
import torch

from reft_kernels.hf import intervention_locations, locations_to_rows, parse_positions


def _loop_reference(mask, spec, prompt_lengths, share):
    """One example at a time, in Python: the convention of reft_kernels/hf/positions.py."""
    first, last = (None, None) if spec == "all" else spec
    out = []
    for b in range(mask.shape[0]):
        real = [i for i in range(mask.shape[1]) if mask[b, i]]
        n = len(real) if prompt_lengths is None else max(0, min(int(prompt_lengths[b]), len(real)))
        prompt = real[:n]
        if spec == "all":
            out.append(prompt + [-1] * (mask.shape[1] - n))
            continue
        cap = n // 2 if (first and last) else n
        nf, nl = min(first, cap), min(last, cap)
        f = prompt[:nf] + [-1] * (first - nf)
        lst = (prompt[n - nl:] if nl else []) + [-1] * (last - nl)
        if share:
            out.append(f + lst)
        else:
            w = max(first, last)
            out.append([f + [-1] * (w - first), lst + [-1] * (w - last)])
    return torch.tensor(out, dtype=torch.long).reshape(
        (mask.shape[0], -1) if share or spec == "all" else (mask.shape[0], 2, max(first, last)))


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
