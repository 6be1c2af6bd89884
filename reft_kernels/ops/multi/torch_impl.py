"""The multi-adapter ops in PyTorch ops (``backend="torch"``): any device and dtype, float64
included; the CPU path, and the backward of every backend. No host synchronisation, no
data-dependent shape, no atomics: every reduction over rows is a matmul or a gathered sum in a
fixed order, so results repeat bitwise.

Low-rank edit, K adapters of rank r, in one of two forms (``sparse_form`` picks per call):

- masked: one low-rank edit of rank K r with the concatenated (K r, d) parameters whose (n, K r)
  latent is masked to each row's own r-column block (rows with id -1 get none). Every gradient
  lands in its adapter's slice by itself (``dA_cat = ga^T x``, ``dB_cat = z^T g``, ... with the
  masked ``ga``, ``gz``, ``z``). Plain GEMMs at K times the flops of one adapter; traces with
  ``torch.compile(fullgraph=True)``.
- sparse: the same edit through the (n, K r) CSR pattern of each row's block (r entries per row,
  known without a sync): the latent from ``torch.sparse.sampled_addmm`` (each row's dots with its
  own adapter's rows only), ``h + z B`` and the ``dh`` terms as ``embedding_bag`` sums (row i
  gathers its adapter's r rows of B), parameter gradients as ``embedding_bag`` sums over the
  pattern's transpose (each adapter's rows, in row order). Cost flat in K. CPU eager only:
  ``torch.compile`` does not trace CSR tensors, and on CUDA the Triton forward is the default.

Measured on this project's 2-core CPU (AMD EPYC, one thread, load average 1.5 from other work),
fp32, d = 576, r = 4, LoReFT-shaped (tied B = C), the row math alone (no index handling), medians
in ms; "single" is ``ops/lowrank_edit/torch_impl`` on the same rows with one adapter:

    rows  K    forward: single  masked  sparse    backward: single  masked  sparse
    224   1             0.103   0.134   0.230               0.158   0.209   0.476
    224   4             0.103   0.223   0.237               0.160   0.366   0.509
    224   16            0.103   0.599   0.252               0.161   1.014   0.527
    224   64            0.105   2.121   0.265               0.158   4.644   1.759
    1024  4             0.455   0.855   0.691               0.696   1.452   1.268
    1024  16            0.434   2.588   0.759               0.642   4.613   1.446
    1024  64            0.437   10.64   0.848               0.668   18.03   4.115

Hence the rule: masked up to K r = 16 (``MASKED_MAX_WIDTH``), sparse above on CPU. Since then
the sparse form keeps its pattern per ids tensor (``_pattern_of``: a model's layers share one ids
tensor per forward) and computes LoReFT's latent as one sampled product (``x (A - C)^T``), and
its forward also runs from K = 4 adapters (``SPARSE_FORWARD_MIN_K``). Other forms measured and
dropped: gathering each row's parameters (``A[ids]``, (n, r, d)) then batched dots or einsum,
0.5-60 ms at these shapes (n r d elements written and read per parameter, the dots as n tiny
matmuls; at 224 rows, K = 16, the gather alone 49 us against 51 us for the whole sampled
product); a dense (n, K r) latent then a gather (3.5x the sampled product); a CSR product for
``z B`` (1.4-10x slower than ``embedding_bag``); a per-adapter loop over sorted rows (needs the
counts on the host: a sync). The whole op at f7+l7 (``reft-kernels bench --multi``, K = 16, 224
listed rows of 1024): 1.01-1.08x the one-adapter op's forward, 0.97-1.19x its forward and
backward (three runs, ``bench/results/cpu-amd-epyc/multi_adapter.md``).

RED: each row's scale and bias are gathered (an extra identity slot, scale 1 and bias 0, for id
-1), ``y = addcmul(t, h, s)`` in ``h``'s dtype (one rounding, as ``ops/red/torch_impl``); the
backward's per-adapter column sums of ``g * h`` and ``g`` (accumulation dtype) are a (K, N)
one-hot matmul up to K = 16, above it (CPU eager) ``embedding_bag`` sums over each adapter's rows.
With one id per sequence ((B,) ids for a (B, ..., d) h) each sequence's scale and bias are
gathered once and broadcast, and the backward sums each sequence's rows first. The slots and the
one-hot matrix are kept per ids tensor (``_rows.cached_facts``), and the backward's ``dh`` reuses
the (N, d) buffer of ``g * h`` (see ``red_bwd``).

Numerics of the low-rank edit as ``ops/lowrank_edit/torch_impl``: rows and parameters converted
to the accumulation dtype (float32; float64 for float64 ``h``), latent, activation and
``h + z B`` computed there, ``y`` rounded once. Unlike there, fp16/bf16 rows are converted in one
piece (an (n, d) fp32 copy), not block by block.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..._activations import IDENTITY, act_grad_torch, act_torch
from ..lowrank_edit import torch_impl as lowrank_torch
from ..._rows import (
    acc_dtype, adds_rows, as_2d_plus, as_rows, cached_facts, const_row, edit_plan, gather_rows, put_rows_,
    rows_view, scratch_buffer,
)

# ----------------------------------------------------------------------------- RED


def _slot(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Row -> parameter slot: the adapter id, or the extra identity slot ``k`` for -1."""
    return torch.where(ids >= 0, ids, k)


def _slots(ids: torch.Tensor, k: int) -> torch.Tensor:
    """``_slot`` kept per ids tensor (a model's RED layers share one ids tensor per forward)."""
    return cached_facts("red_slot", ids, (k,), lambda t, lead: _slot(t, lead[0]))


def _cast(t, dtype):
    """``t`` in ``dtype`` (None stays None); no call when it has it already (``Tensor.to`` to its
    own dtype still costs a dispatch, about 1-3 us on the 2-core CPU)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _gather_slots(stack: torch.Tensor, identity: float, like: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(len(ids), d): each id's row of the (K, d) ``stack`` in ``like``'s dtype, the constant row
    ``identity`` (1 for a scale, 0 for a bias) for id -1: one ``cat`` and one ``index_select``."""
    return torch.cat([_cast(stack, like.dtype), const_row(like, identity)]).index_select(0, _slots(ids, stack.shape[0]))


def _groups(t2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, d) rows as (G, N / G, d) for G = len(ids): one id per group of consecutive rows (one per
    row: G = N, groups of one)."""
    return t2.view(ids.shape[0], -1, t2.shape[1]) if ids.shape[0] else t2.view(0, 1, t2.shape[1])


def red_fwd(h2, scale, bias, ids):
    """(N, d) rows, (K, d) stacks (either may be None), ids -> y (N, d) in h2's dtype. ``ids``:
    (N,), one per row, or (G,) with G dividing N, one per group of N / G consecutive rows (one
    per sequence of a (G, ..., d) h): then each group's scale and bias are gathered once, (G, d),
    and broadcast over its rows, where per-row ids gather (N, d)."""
    h3 = _groups(h2, ids)
    s = _gather_slots(scale, 1.0, h2, ids)[:, None] if scale is not None else None
    t = _gather_slots(bias, 0.0, h2, ids)[:, None] if bias is not None else None
    if s is not None and t is not None:
        y3 = torch.addcmul(t, h3, s)
    else:
        y3 = h3 * s if s is not None else h3 + t
    return y3.view(h2.shape)


def _onehot(ids: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """(K, n) matrix with a 1 at (ids[i], i); rows with id -1 have none."""
    return (ids[None, :] == torch.arange(k, device=ids.device)[:, None]).to(dtype)


def _onehots(ids: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """``_onehot`` kept per ids tensor (RED's backward; the sparse form's bias gradients)."""
    return cached_facts("onehot", ids, (k, dtype), lambda t, lead: _onehot(t, *lead))


def red_bwd(g2, h2, scale, ids, k, need_dh, need_ds, need_dt):
    """(dh (N, d) in g2's dtype, ds (K, d), dt (K, d) in the accumulation dtype), each None when
    not needed. ``h2`` is only read for ``ds``; ``ids`` as ``red_fwd`` takes them: with one id
    per group of rows, each group's column sums come first ((G, d), in row order), then the
    per-adapter sums as a (K, G) one-hot matmul.

    Memory as ``ops/red/torch_impl.bwd`` where g is in the accumulation dtype: one (N, d) tensor,
    whose storage first holds ``g * h`` and then ``dh`` (each fresh (N, d) tensor pays its page
    faults: forward + backward over (16, 64, 576) fp32 with one id per sequence took 1.50 ms with
    a second buffer and 0.57 ms with one, 2-core CPU, glibc's default malloc)."""
    acc = acc_dtype(g2.dtype)
    per_row = ids.shape[0] == g2.shape[0]
    g3, h3 = _groups(g2, ids), (_groups(h2, ids) if need_ds else None)
    dh = ds = dt = buf = None
    if need_ds or need_dt:
        if per_row and sparse_form(g2, k):  # per-adapter sums gathered row by row: O(N d), not O(K N d)
            pat = _pattern_of(ids, k, 1, acc)
            ones = pat.valid.to(acc)
            colsum = lambda t: pat.apply_t(ones, t.view(g2.shape))  # noqa: E731
        else:
            onehot = _onehots(ids, k, acc)
            colsum = lambda t: onehot @ (t.view(g2.shape) if per_row else t.sum(1))  # noqa: E731
        ga3 = _cast(g3, acc)
        if need_ds:
            buf = ga3 * _cast(h3, acc)
            ds = colsum(buf)
        if need_dt:
            dt = colsum(ga3)
    if need_dh:
        if scale is None:
            dh = g2
        else:
            s = _gather_slots(scale, 1.0, g2, ids)[:, None]
            out = buf if buf is not None and buf.dtype == g2.dtype else None
            dh = torch.mul(g3, s, out=out).view(g2.shape)
    return dh, ds, dt


# ----------------------------------------------------------------------------- low-rank edit


def _flat(t, kr):
    """A (K, r, d) stack as (K r, d), a (K, r) one as (K r,); None stays None."""
    return None if t is None else t.reshape(kr, *t.shape[2:])


def block_mask(ids: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """(n, K r) bool: row i keeps columns [ids[i] r, (ids[i] + 1) r), none for id -1."""
    owner = torch.arange(k * r, device=ids.device) // r
    return ids[:, None] == owner[None, :]


def _compact(t: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """(n, K r) masked to one block per row -> that block, (n, r) (zeros elsewhere add exactly)."""
    return t.view(t.shape[0], k, r).sum(1)


# Which form ``fwd_rows`` / ``bwd_rows`` / ``red_bwd`` take: None for the rule (``sparse_form``),
# or "masked" / "sparse" to force one (tests).
FORM = None
# The masked form's latent is K r columns wide: up to this width its GEMMs beat the sparse form's
# fixed cost (the measurements in the module docstring).
MASKED_MAX_WIDTH = 16
# From this many adapters the forward takes the sparse form at any width: with its pattern kept
# per ids tensor and LoReFT's latent one sampled product, it took 0.46-0.80x the masked forward's
# time at K = 4 and 8, r = 4 (K r = 16 and 32; 224 listed and 1024 rows, d = 576, 2-core CPU);
# at K = 1 the masked form (one dense edit) kept the lead for r >= 16 (1.1-2x).
SPARSE_FORWARD_MIN_K = 4


def sparse_form(x: torch.Tensor, width: int, k: int | None = None) -> bool:
    """The rule: the sparse form for CPU tensors in eager mode when the stacked width ``width``
    (K r; K for RED) is above ``MASKED_MAX_WIDTH``, or, for a forward (``k`` its number of
    adapters), when ``k >= SPARSE_FORWARD_MIN_K``; the masked form otherwise. The masked form
    everywhere else: on CUDA (where the Triton forward is the default, and cuSPARSE's products
    are not promised to sum in a fixed order) and inside ``torch.compile`` (which does not trace
    sparse CSR tensors)."""
    if x.shape[0] == 0:  # nothing to gather
        return False
    if FORM is not None:
        return FORM == "sparse"
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return width > MASKED_MAX_WIDTH or (k is not None and k >= SPARSE_FORWARD_MIN_K)


def _derive_block(ids, key):
    k, r = key
    return block_mask(ids, k, r)


def _derive_pattern(ids, key):
    k, r, dtype = key
    return _Pattern(ids, r, k, dtype)


def _block_of(ids, k, r):
    """``block_mask(ids, k, r)``, derived once per ids tensor (``_rows.cached_facts``): a model's
    layers share one ids tensor per forward, and an op called again with the same ids (training
    steps over one batch, the benchmarks) derives nothing."""
    return cached_facts("multi-block", ids, (k, r), _derive_block)


def _pattern_of(ids, k, r, dtype):
    """The sparse form's ``_Pattern`` of ``ids``, derived once per ids tensor (as ``_block_of``),
    with its transpose (built by the first backward) kept on it."""
    return cached_facts("multi-pattern", ids, (k, r, dtype), _derive_pattern)


def _and(mask, keep):
    return mask if keep is None else mask & keep


def fwd_rows(x, ids, A, a, B, C, c, spec, save_u, keep=None, delta=False):
    """Rows ``x`` (n, d) and the stacks in the accumulation dtype, ``ids`` (n,) (-1: no edit) ->
    (y (n, d) in x's dtype, z (n, r), u (n, r) or None), ``z`` and ``u`` zero on unedited rows.
    ``keep`` (n, 1) bool or None: rows where it is False are not edited either (index padding).
    ``delta``: ``z B`` (the row's own adapter's B) in ``y``'s place."""
    k, r = B.shape[0], B.shape[1]
    kr = k * r
    A2, a2, B2, c2 = _flat(A, kr), _flat(a, kr), _flat(B, kr), _flat(c, kr)
    cm = B2 if spec.tied else _flat(C, kr)
    if sparse_form(x, kr, k):
        return _fwd_sparse(x, _pattern_of(ids, k, r, x.dtype), A2, a2, B2, cm, c2, spec, save_u, keep, delta)
    return _fwd_masked(x, _and(_block_of(ids, k, r), keep), A2, a2, B2, cm, c2, spec, save_u, k, r, delta)


def _fwd_masked(x, mask, A2, a2, B2, cm, c2, spec, save_u, k, r, delta):
    # the rank-K r latent of every row, then masked to the row's own block
    z, u = lowrank_torch._latent(x, A2, a2, B2, cm, c2, spec, lowrank_torch._difference(A2, B2, cm, spec))
    z = torch.where(mask, z, 0)
    y = z @ B2 if delta else torch.addmm(x, z, B2)
    u_c = _compact(torch.where(mask, u, 0), k, r) if save_u else None
    return y, _compact(z, k, r), u_c


class _Pattern:
    """The sparse form's (n, K r) CSR pattern: row i holds the r columns of its adapter's block
    (of adapter 0 for id -1, whose values are then zero), so every row has r entries and the
    pattern, like its transpose, is built without a host synchronisation. Holds tensors derived
    from the ids, not the ids themselves (``_pattern_of`` keys its cache on a weak reference)."""

    def __init__(self, ids, r, k, dtype):
        n = ids.shape[0]
        dev = ids.device
        self.n, self.r, self.k = n, r, k
        self.slot = ids.clamp_min(0)
        self.valid = (ids >= 0)[:, None]
        self.crow = torch.arange(n + 1, device=dev) * r
        self.col = (self.slot[:, None] * r + torch.arange(r, device=dev)).reshape(-1)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.pat = torch.sparse_csr_tensor(self.crow, self.col, torch.zeros(n * r, dtype=dtype, device=dev),
                                               (n, k * r))
        self._t = None

    def sampled(self, x, W):
        """``(x W^T)`` at the pattern, (n, r): each row's dots with its own adapter's rows of W."""
        return torch.sparse.sampled_addmm(self.pat, x, W.t(), beta=0).values().view(-1, self.r)

    def gather(self, vec):
        """A (K r,) bias at the pattern, (n, r)."""
        return vec.index_select(0, self.col).view(-1, self.r)

    def apply(self, values, W):
        """The pattern holding ``values`` (n, r) times ``W`` (K r, d): row i is
        ``sum_j values[i, j] W[k_i r + j]``, (n, d), as an ``embedding_bag`` (one bag of r rows
        of W per row, summed in order; a CSR product was 1.4-10x slower on this CPU)."""
        return F.embedding_bag(self.col.view(self.n, self.r), W, per_sample_weights=values, mode="sum")

    def apply_t(self, values, x):
        """The transpose of the pattern holding ``values`` (n, r) times ``x`` (n, d): (K r, d),
        row k r + j the sum over adapter k's rows i (in row order) of ``values[i, j] x[i]``; an
        ``embedding_bag`` over the transpose's CSR structure (``_transpose``)."""
        crow, col, src = self._transpose()
        return F.embedding_bag(col, x, crow, per_sample_weights=values.reshape(-1).index_select(0, src),
                               mode="sum", include_last_offset=True)

    def _transpose(self):
        """(crow, col, src) of the transpose (K r, n) in CSR: row k r + j lists adapter k's rows in
        row order (id -1 rows under adapter 0, with zero values), entry e holding element
        ``src[e]`` of the (n r,) values. Derived once per pattern: rows sorted by adapter (a
        stable sort), each adapter's start from a cumulative count; no host synchronisation."""
        if self._t is None:
            n, r, dev = self.n, self.r, self.slot.device
            slot = self.slot
            order = torch.argsort(slot, stable=True)
            counts = torch.bincount(slot, minlength=self.k)
            start = torch.cumsum(counts, 0) - counts
            j = torch.arange(r, device=dev)
            crow = torch.cat([(start[:, None] * r + j * counts[:, None]).reshape(-1),
                              torch.full((1,), n * r, device=dev, dtype=start.dtype)])
            ks = slot.index_select(0, order)
            ks_start, ks_count = start.index_select(0, ks), counts.index_select(0, ks)
            pos = ((ks_start * r + torch.arange(n, device=dev) - ks_start)[:, None] + j * ks_count[:, None]).reshape(-1)
            src = torch.empty_like(pos).index_put_((pos,), (order[:, None] * r + j).reshape(-1))
            col = torch.empty_like(pos).index_put_((pos,), order[:, None].expand(n, r).reshape(-1))
            self._t = (crow, col, src)
        return self._t


def _bias(a2, c2):
    """The latent's constant term ``a - c`` (either may be None; None when both are)."""
    if c2 is None:
        return a2
    return c2.neg() if a2 is None else a2 - c2


def _fwd_sparse(x, pat, A2, a2, B2, cm, c2, spec, save_u, keep, delta):
    n, r = x.shape[0], pat.r
    valid = _and(pat.valid, keep)
    u = None
    if spec.act == IDENTITY and not save_u and A2 is not None and cm is not None:
        # z = x (A - C)^T + (a - c): one sampled product instead of two (LoReFT, DiReFT's shape):
        # the forward at f7+l7, 224 rows, d = 576, r = 4, K = 16 went from 0.58 ms to 0.38 ms with
        # the cached pattern and the one-index gathers (2-core CPU, one thread)
        z = pat.sampled(x, A2 - cm)
        bias = _bias(a2, c2)
        if bias is not None:
            z = z + pat.gather(bias)
    else:
        if A2 is not None:
            u = pat.sampled(x, A2)
            if a2 is not None:
                u = u + pat.gather(a2)
        elif a2 is not None:
            u = pat.gather(a2)
        else:
            u = x.new_zeros(n, r)
        z = act_torch(u, spec.act)
        if cm is not None:
            z = z - pat.sampled(x, cm)
        if c2 is not None:
            z = z - pat.gather(c2)
    z = torch.where(valid, z, 0)
    y = pat.apply(z, B2) if delta else pat.apply(z, B2).add_(x)
    return y, z, (torch.where(valid, u, 0) if save_u else None)


def bwd_rows(g, x, ids, z, u, A, B, C, spec, need, keep=None, dh_delta=False):
    """Backward on rows: ``g``, ``x`` (n, d), ``z``, ``u`` (n, r) and the stacks in the
    accumulation dtype, ``ids`` (n,); ``keep`` (n, 1) bool or None as ``fwd_rows`` takes it.
    Returns (dh (n, d) or None, dA, da, dB, dC, dc), the parameter gradients stacked
    ((K, r, d) / (K, r)) or None; unedited rows contribute nothing to them and get ``dh = g``.
    ``dh_delta``: ``dh - g`` in ``dh``'s place (zero rows where unedited)."""
    k, r, d = B.shape
    kr = k * r
    A2, B2 = _flat(A, kr), _flat(B, kr)
    cm = B2 if spec.tied else _flat(C, kr)
    need = list(need)
    need[4] = need[4] and C is not None
    if sparse_form(g, kr):
        grads = _bwd_sparse(g, x, ids, _pattern_of(ids, k, r, g.dtype), keep, z, u, A2, B2, cm, spec, need,
                            dh_delta)
    else:
        grads = _bwd_masked(g, x, _and(_block_of(ids, k, r), keep), z, u, A2, B2, cm, spec, need, k, dh_delta)
    dh, dA, da, dB, dC, dc = grads
    mat = lambda t: None if t is None else t.view(k, r, d)  # noqa: E731
    vec = lambda t: None if t is None else t.reshape(k, r)  # noqa: E731
    return dh, mat(dA), vec(da), mat(dB), mat(dC), vec(dc)


def _bwd_masked(g, x, mask, z, u, A2, B2, cm, spec, need, k, dh_delta):
    need_dh, need_dA, need_da, need_dB, need_dC, need_dc = need
    gz = torch.where(mask, g @ B2.t(), 0)
    if spec.act == IDENTITY:
        ga = gz
    else:
        ga = torch.where(mask, gz * act_grad_torch(u.repeat(1, k), spec.act), 0)
    dh = dA = da = dB = dC = dc = None
    if need_dh:
        if A2 is not None:
            dh = ga @ A2 if dh_delta else torch.addmm(g, ga, A2)
            if cm is not None:
                dh.addmm_(gz, cm, alpha=-1)
        else:
            base = torch.zeros_like(g) if dh_delta else g
            dh = torch.addmm(base, gz, cm, alpha=-1) if cm is not None else base
    if need_dA:
        dA = ga.t() @ x
    if need_da:
        da = ga.sum(0)
    gzx = None
    if need_dC or (need_dB and spec.tied):  # with the identity act, gz^T x is ga^T x
        gzx = dA if (dA is not None and ga is gz) else gz.t() @ x
    if need_dB:
        dB = torch.where(mask, z.repeat(1, k), 0).t() @ g
        if spec.tied:
            dB = dB - gzx
    if need_dC:
        dC = gzx.neg()
    if need_dc:
        dc = gz.sum(0).neg()
    return dh, dA, da, dB, dC, dc


def _bwd_sparse(g, x, ids, pat, keep, z, u, A2, B2, cm, spec, need, dh_delta):
    need_dh, need_dA, need_da, need_dB, need_dC, need_dc = need
    valid = _and(pat.valid, keep)
    gz = torch.where(valid, pat.sampled(g, B2), 0)
    ga = gz if spec.act == IDENTITY else torch.where(valid, gz * act_grad_torch(u, spec.act), 0)
    dh = dA = da = dB = dC = dc = None
    if need_dh:
        if A2 is not None:
            dh = pat.apply(ga, A2) if dh_delta else pat.apply(ga, A2).add_(g)
        else:
            dh = torch.zeros_like(g) if dh_delta else g
        if cm is not None:
            dh = dh - pat.apply(gz, cm) if dh is g else dh.sub_(pat.apply(gz, cm))
    if need_dA:
        dA = pat.apply_t(ga, x)
    if need_da:
        da = _onehots(ids, pat.k, ga.dtype) @ ga
    gzx = None
    if need_dC or (need_dB and spec.tied):  # with the identity act, gz^T x is ga^T x
        gzx = dA if (dA is not None and ga is gz) else pat.apply_t(gz, x)
    if need_dB:
        dB = pat.apply_t(z, g)
        if spec.tied:
            dB = dB - gzx
    if need_dC:
        dC = gzx.neg()
    if need_dc:
        dc = (_onehots(ids, pat.k, gz.dtype) @ gz).neg()
    return dh, dA, da, dB, dC, dc


def fwd(h, index, ids, A, a, B, C, c, spec, save_u):
    """Forward, following ``ops/lowrank_edit/contract.py`` with one adapter id per row (no
    index) or per index entry: returns (y, z, u, hsave)."""
    acc = acc_dtype(h.dtype)
    A, a, B, C, c = (_cast(t, acc) for t in (A, a, B, C, c))
    if index is None:
        x = as_rows(h)
        y, z, u = fwd_rows(_cast(x, acc), ids, A, a, B, C, c, spec, save_u)
        return y.to(h.dtype), z, u, None
    n, r, d = index.shape[0], B.shape[1], h.shape[-1]
    hv = rows_view(h)
    if hv.numel() == 0:  # no rows to edit: every entry is padding
        zeros = h.new_zeros((n, r), dtype=acc)
        return h, zeros, (zeros.clone() if save_u else None), h.new_zeros((n, d))
    # one row per entry, a padding entry reading the first real entry's row (``keep`` False
    # there: z is 0 and y = x), written back as ``put_rows_`` does (``edit_plan``: one lookup)
    keep, remap, target = edit_plan(hv, index)
    x = gather_rows(hv, target)
    if n and adds_rows(hv, target):
        # h's rows += z B (``_rows.adds_rows``): a padding entry adds its zero latent times its
        # id's B, zero for finite parameters (as every row's zero blocks in the masked form), to
        # the first real entry's row. Masking those rows instead (``torch.where`` on (n, d)) took
        # 79 us, more than the 50 us the add saves (224 rows, d = 576, 2-core CPU, one thread).
        delta, z, u = fwd_rows(x, ids, A, a, B, C, c, spec, save_u, keep, delta=True)
        hv.index_add_(0, target[0], delta)
        return h, z, u, x
    y, z, u = fwd_rows(_cast(x, acc), ids, A, a, B, C, c, spec, save_u, keep)
    if n:
        hv.index_put_(target, y.to(h.dtype).index_select(0, remap))
    return h, z, u, x


def bwd(g, x, index, ids, A, B, C, z, u, spec, need):
    """Backward: (dh or None, (dA, da, dB, dC, dc)) in the accumulation dtype (dh in g's)."""
    acc = acc_dtype(x.dtype)
    A, B, C = (_cast(t, acc) for t in (A, B, C))
    z, u = _cast(z, acc), _cast(u, acc)
    if index is None:
        out = bwd_rows(_cast(as_rows(g), acc), _cast(as_rows(x), acc), ids, z, u, A, B, C, spec, need)
        dh = out[0].to(g.dtype).reshape(g.shape) if need[0] else None
        return dh, out[1:]
    if g.numel() == 0:  # h had no rows: every entry is padding, every gradient is zero
        zeros = x.new_zeros(x.shape, dtype=acc)
        out = bwd_rows(zeros, zeros, torch.full_like(ids, -1), z, u, A, B, C, spec, need)
        return (g.clone() if need[0] else None), out[1:]
    scratch = scratch_buffer(g, index) if need[0] and index.numel() else None
    if scratch is not None:
        # dh in an (N + 1, d) buffer, as ``ops/lowrank_edit/torch_impl.bwd``: g's rows, then a
        # zero scratch row that padding entries read and write (their g is zero, so they add
        # nothing to the parameters without a mask; z is zero there from the forward)
        buf, ssel = scratch
        n_rows = buf.shape[0] - 1
        add = adds_rows(buf, (ssel,))
        out = bwd_rows(_cast(buf.index_select(0, ssel), acc), _cast(x, acc), ids, z, u, A, B, C, spec, need,
                       dh_delta=add)
        if add:
            buf.index_add_(0, ssel, out[0])
        else:
            buf.index_put_((ssel,), out[0].to(g.dtype))
        return buf[:n_rows].view(g.shape), out[1:]
    gv = rows_view(g)
    keep, _, target = edit_plan(gv, index)
    out = bwd_rows(_cast(gather_rows(gv, target), acc), _cast(x, acc), ids, z, u, A, B, C, spec, need, keep)
    dh = None
    if need[0]:
        dh = g.clone(memory_format=torch.contiguous_format)
        put_rows_(as_2d_plus(dh), index, out[0].to(g.dtype))
    return dh, out[1:]
