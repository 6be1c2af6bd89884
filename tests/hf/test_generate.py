"""``generate`` on patched causal LMs (LLaMA, GPT-2): batching, beam search, the KV cache, and the
rule that ReFT edits the prompt (the prefill forward) only while RED edits every token.

The models are float64 with ``backend="torch"`` so that greedy/beam decisions cannot flip on
rounding (one float32 + Triton case checks the kernels' path). The intervention parameters are set
to random values large enough to change the generations (each test asserts that they do), and
EOS is suppressed (``min_new_tokens``) so every example generates the same number of tokens.

References, none of them the code under test:
- generating each example alone (no padding) for the batched tests;
- a greedy loop written here over the *base* model, with plain forward hooks doing the LoReFT /
  RED formulas at the prompt positions and full (cache-free) forwards at every step;
- one teacher-forced forward over prompt + generated tokens.
"""
from __future__ import annotations

import pytest
import torch

from reft_kernels import _backend
from reft_kernels.hf import REDConfig, ReftConfig, get_reft_model, intervention_locations

from ._models import layers_of, padded_batch, tiny_model

ARCHS = ("llama", "gpt2")
KINDS = ("reft_shared", "reft_unshared", "red")
EOS = 2
NEW = 4
LENGTHS = (5, 3, 6)  # real prompt lengths of the batch, left-padded to SEQ
SEQ = 6


def make_config(kind: str, backend: str = "torch", positions: str = "f2+l2"):
    if kind == "reft_shared":
        return ReftConfig(layers="all", rank=4, positions=positions, backend=backend)
    if kind == "reft_unshared":
        return ReftConfig(layers="all", rank=4, positions=positions, share_weights=False, backend=backend)
    if kind == "red":
        return REDConfig(layers="all", backend=backend)
    raise ValueError(kind)


def randomize_(model, seed: int = 1, reft_scale: float = 0.03, red_scale: float = 0.1, red_bias: float = 0.01):
    """Random intervention parameters (R stays the random orthonormal init): RED's scale around 1
    and a small bias, ReFT's W and b small random values, of the size of these tiny models'
    hidden states."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for cfg, ivs in zip(model.reft.configs, model.reft_interventions):
            for name, p in ivs.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                if name.endswith("rotation"):
                    continue
                if isinstance(cfg, REDConfig):
                    p.copy_(1 + red_scale * noise if name.endswith("scale") else red_bias * noise)
                else:
                    p.copy_(reft_scale * noise)
    return model


def patched(arch, kind, *, dtype=torch.float64, backend="torch", positions="f2+l2", seed=1):
    model = tiny_model(arch, dtype=dtype)
    configs = [make_config(k, backend, positions) for k in kind.split("+")]
    get_reft_model(model, configs, verbose=False)
    return randomize_(model, seed)


def gen(model, ids, mask, **kw):
    """The NEW generated tokens (B, NEW) of greedy (or beam) generation, EOS suppressed."""
    kw.setdefault("use_cache", True)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, **kw)
    assert out.shape == (ids.shape[0], ids.shape[1] + NEW)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    return out[:, ids.shape[1]:]


def one_by_one(model, ids, mask, **kw):
    """Each example generated alone, its padding stripped (left padding)."""
    rows = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        rows.append(gen(model, ids[b:b + 1, ids.shape[1] - n:], mask[b:b + 1, ids.shape[1] - n:], **kw)[0])
    return torch.stack(rows)


def left_batch(seed=2):
    return padded_batch(list(LENGTHS), SEQ, "left", seed=seed)


def assert_changes_generation(arch, ids, mask, got, **kw):
    """The interventions must matter: the base model generates something else for some example."""
    base = gen(tiny_model(arch, dtype=torch.float64), ids, mask, **kw)
    assert not torch.equal(got, base), "the random interventions do not change the generations: the test is vacuous"


# ---------------------------------------------------------------- an independent reference
def red_site(model, layer):
    blk = layers_of(model)[layer]
    return blk.mlp.c_proj if hasattr(blk.mlp, "c_proj") else blk.mlp.down_proj


def prompt_positions(n: int, positions: str):
    """(first, last) position lists of an unpadded prompt of n tokens for "f{k}+l{k}" (each side
    capped at n // 2) or "all"."""
    if positions == "all":
        return list(range(n)), []
    k = int(positions.split("+")[0][1:])
    cap = min(k, n // 2)
    return list(range(cap)), list(range(n - cap, n))


def reference_greedy(arch, patched_model, prompt, positions="f2+l2"):
    """Greedy decoding of one unpadded prompt (1, n) on a fresh base model with hooks written here:
    LoReFT ``h + (h W^T + b - h R^T) R`` on each layer's output at the prompt positions only,
    RED ``h * scale + bias`` on each MLP output projection at every token. Every step is a full
    forward without cache, so nothing depends on the library's decode detection."""
    base = tiny_model(arch, dtype=torch.float64)
    n = prompt.shape[1]
    first, last = prompt_positions(n, positions)
    hooks = []
    for cfg, ivs in zip(patched_model.reft.configs, patched_model.reft_interventions):
        for key, iv in ivs.items():
            layer = int(key.removeprefix("layer").split("_")[0])
            if isinstance(cfg, REDConfig):
                def red_hook(mod, args, out, iv=iv):
                    return out * iv.scale.detach() + iv.bias.detach()
                hooks.append(red_site(base, layer).register_forward_hook(red_hook))
                continue
            pos = first + last if key.endswith(f"layer{layer}") else (first if key.endswith("_first") else last)
            R, W, b = iv.R.detach(), iv.weight.detach(), iv.bias.detach()

            def reft_hook(mod, args, out, pos=pos, R=R, W=W, b=b):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                x = h[:, pos]
                h[:, pos] = x + (x @ W.T + b - x @ R.T) @ R
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            hooks.append(layers_of(base)[layer].register_forward_hook(reft_hook))
    seq = prompt
    try:
        with torch.no_grad():
            for _ in range(NEW):
                logits = base(input_ids=seq, use_cache=False).logits[0, -1].clone()
                logits[EOS] = -float("inf")
                seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    finally:
        for h in hooks:
            h.remove()
    return seq[0, n:]


# ---------------------------------------------------------------- 1. batched greedy
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_equals_one_by_one(arch, kind):
    model = patched(arch, kind)
    ids, mask = left_batch()
    got = gen(model, ids, mask)
    assert torch.equal(got, one_by_one(model, ids, mask)), got
    assert_changes_generation(arch, ids, mask, got)
    if kind != "red":
        # explicit prompt locations (what the collator / a user passes) give the same tokens
        loc = intervention_locations(mask, "f2+l2", share_weights=kind == "reft_shared")
        assert torch.equal(gen(model, ids, mask, intervention_locations=loc), got)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reft_shared", "reft_unshared", "red", "reft_shared+red"])
def test_greedy_matches_reference_loop(arch, kind):
    """Against the hand-written hooks: prompt positions edited once (carried by the cache), decode
    tokens not edited by ReFT, every token edited by RED."""
    model = patched(arch, kind)
    ids, mask = left_batch()
    got = gen(model, ids, mask)
    for b, n in enumerate(LENGTHS):
        want = reference_greedy(arch, model, ids[b:b + 1, SEQ - n:])
        assert torch.equal(got[b], want), (b, got[b], want)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_float32_triton(arch, device):
    """float32 with the Triton kernels (compiled on a GPU, the interpreter on the CPU), shared and
    unshared ReFT and RED together."""
    if "triton" not in _backend.available_backends(device):
        pytest.skip(f"triton is not available on {device}")
    model = patched(arch, "reft_shared+reft_unshared+red", dtype=torch.float32, backend="triton").to(device)
    ids, mask = (t.to(device) for t in left_batch())
    got = gen(model, ids, mask)
    assert torch.equal(got, one_by_one(model, ids, mask)), got
    base = gen(tiny_model(arch, dtype=torch.float32).to(device), ids, mask)
    assert not torch.equal(got, base)


# ---------------------------------------------------------------- 2. beam search
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_batched_equals_one_by_one(arch, kind, num_beams):
    model = patched(arch, kind)
    ids, mask = left_batch()
    got = gen(model, ids, mask, num_beams=num_beams)
    assert torch.equal(got, one_by_one(model, ids, mask, num_beams=num_beams)), got
    assert_changes_generation(arch, ids, mask, got, num_beams=num_beams)
    if kind != "red":
        # explicit locations are expanded to the beams with the other model inputs
        loc = intervention_locations(mask, "f2+l2", share_weights=kind == "reft_shared")
        assert torch.equal(gen(model, ids, mask, num_beams=num_beams, intervention_locations=loc), got)


# ---------------------------------------------------------------- 3. teacher forcing
def position_ids(mask):
    """Positions counted over the real tokens, as ``generate`` computes them for left padding
    (GPT-2's learned absolute positions need them; LLaMA's RoPE does not care)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def teacher_forced_argmax(model, ids, mask, new, locations=None):
    """Argmax (EOS excluded) of one forward over prompt + ``new`` at the positions that predict
    each generated token."""
    full = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    kw = {} if locations is None else {"intervention_locations": locations}
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask), **kw).logits
    logits = logits[:, ids.shape[1] - 1: -1].clone()
    logits[..., EOS] = -float("inf")
    return logits.argmax(-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_generation_equals_teacher_forced_forward(arch, kind):
    model = patched(arch, kind)
    ids, mask = left_batch()
    new = gen(model, ids, mask)
    loc = None
    if kind != "red":
        # the prompt's locations: positions in the padded input, unchanged by appending tokens
        loc = intervention_locations(mask, "f2+l2", share_weights=kind == "reft_shared")
    assert torch.equal(teacher_forced_argmax(model, ids, mask, new, loc), new)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_decode_steps_are_not_edited(arch, share):
    """positions="all" edits every prompt token in the prefill; the generated tokens must be those
    of a forward whose locations cover the prompt only, and not those of a forward that also edits
    the generated tokens (which the test checks do differ, so it can fail)."""
    model = tiny_model(arch, dtype=torch.float64)
    cfg = ReftConfig(layers="all", rank=4, positions="all" if share else "f3+l3", share_weights=share,
                     backend="torch")
    get_reft_model(model, cfg, verbose=False)
    randomize_(model)
    ids, mask = left_batch()
    new = gen(model, ids, mask)
    prompt_loc = intervention_locations(mask, cfg.positions, share_weights=share)
    if share:
        # padded to the full width with -1 for the generated columns
        prompt_loc = torch.nn.functional.pad(prompt_loc, (0, NEW), value=-1)
    assert torch.equal(teacher_forced_argmax(model, ids, mask, new, prompt_loc), new)
    # the alternative (decode steps edited too) predicts other tokens
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    every_loc = intervention_locations(full_mask, cfg.positions, share_weights=share)
    assert not torch.equal(teacher_forced_argmax(model, ids, mask, new, every_loc), new)
    # without intervention_locations the forward counts every real token as the prompt: the same
    # as every_loc, not what generation did
    assert torch.equal(teacher_forced_argmax(model, ids, mask, new), teacher_forced_argmax(model, ids, mask, new,
                                                                                       every_loc))


# ---------------------------------------------------------------- 4. use_cache=False
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reft_shared", "reft_unshared"])
def test_no_cache_with_explicit_locations_equals_cached(arch, kind):
    """Without a cache every step is a full forward; given the prompt's locations, each step edits
    the prompt rows only, which is what the cached generation computes."""
    model = patched(arch, kind)
    ids, mask = left_batch()
    loc = intervention_locations(mask, "f2+l2", share_weights=kind == "reft_shared")
    cached = gen(model, ids, mask)
    assert torch.equal(gen(model, ids, mask, use_cache=False, intervention_locations=loc), cached)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["reft_shared", "reft_unshared", "reft_shared+red"])
def test_no_cache_without_locations_equals_cached(arch, kind):
    """Without a cache every step is a full forward over the grown sequence, whose mask would make
    the generated tokens part of the "prompt"; the patched ``generate`` fixes the prompt's
    locations from the call's attention mask, so the edits stay on the prompt."""
    model = patched(arch, kind)
    ids, mask = left_batch()
    cached = gen(model, ids, mask)
    assert torch.equal(gen(model, ids, mask, use_cache=False), cached)
    assert torch.equal(gen(model, ids, mask, use_cache=False, num_beams=2), gen(model, ids, mask, num_beams=2))


def drifting_greedy(model, ids, mask, positions="f2+l2"):
    """Greedy loop of full forwards whose locations are recomputed from the grown mask at every
    step (every real token counted as the prompt): what a cache-free generation would do if
    nothing fixed the prompt's locations."""
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(NEW):
            loc = intervention_locations(m, positions)
            logits = model(input_ids=seq, attention_mask=m, position_ids=position_ids(m),
                           intervention_locations=loc).logits[:, -1].clone()
            logits[:, EOS] = -float("inf")
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ARCHS)
def test_drifting_positions_would_change_the_generation(arch):
    """The no-cache tests above can fail: recomputing the positions from the grown mask at each
    step generates other tokens than the prompt-only (cached) generation."""
    model = patched(arch, "reft_shared")
    ids, mask = left_batch()
    assert not torch.equal(drifting_greedy(model, ids, mask), gen(model, ids, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_cache_single_prompt_without_attention_mask(arch):
    """``generate(input_ids)`` alone (no attention mask given, one unpadded prompt) without a
    cache edits the prompt only, as with a cache."""
    model = patched(arch, "reft_shared")
    ids, mask = left_batch()
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    drift_matters = False
    for b, n in enumerate(LENGTHS):
        prompt = ids[b:b + 1, SEQ - n:]
        cached = model.generate(prompt, use_cache=True, **kw)[:, n:]
        assert torch.equal(cached, gen(model, prompt, torch.ones_like(prompt)))
        drift_matters |= not torch.equal(drifting_greedy(model, prompt, torch.ones_like(prompt)), cached)
        assert torch.equal(model.generate(prompt, use_cache=False, **kw)[:, n:], cached), b
    assert drift_matters, "no prompt whose generation changes with drifting positions: the test is vacuous"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_cache_configs_with_different_positions(arch):
    model = tiny_model(arch, dtype=torch.float64)
    get_reft_model(model, [ReftConfig(layers=[0], rank=4, positions="f2+l2", backend="torch"),
                           ReftConfig(layers=[1, 2], rank=4, positions="l3", backend="torch")], verbose=False)
    randomize_(model)
    ids, mask = left_batch()
    cached = gen(model, ids, mask)
    assert_changes_generation(arch, ids, mask, cached)
    assert torch.equal(gen(model, ids, mask, use_cache=False), cached)


@pytest.mark.parametrize("arch", ARCHS)
def test_red_no_cache_equals_cached(arch):
    model = patched(arch, "red")
    ids, mask = left_batch()
    assert torch.equal(gen(model, ids, mask, use_cache=False), gen(model, ids, mask))
