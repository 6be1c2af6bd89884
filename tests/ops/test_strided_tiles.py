"""The GPU tiles the launchers pick when a column stride of the activations is not 1 (``h.mT``,
``h[..., ::2]``): every element then needs its own 64-bit address, and the contiguous tiles
spilled under Triton 3.6 or 3.9 (tools/triton_compile_check.py compiles the kernels at column
strides of 16 with exactly these tiles; here, that the launchers' tile functions take them)."""
import pytest
import torch

from reft_kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def test_red_backward_takes_a_narrower_tile_for_strided_columns():
    from reft_kernels.ops.red import plan as RP

    assert RP.bwd_tile(4096, True) == (16, 256, 4)
    assert RP.bwd_tile(4096, True, strided_cols=True) == (16, RP.RED_STRIDED_BLOCK_D, 4)
    assert RP.bwd_tile(40, True, strided_cols=True) == (16, 64, 4)  # still shrunk to d
    assert RP.bwd_tile(4096, False, strided_cols=True) == RP.bwd_tile(4096, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128])
def test_lowrank_launchers_take_the_strided_tile(dtype, r_pad):
    from reft_kernels.ops.lowrank_edit import plan as P

    if r_pad > P.triton_max_rank(dtype):
        pytest.skip("rank beyond the Triton path for this dtype")
    tile = P.STRIDED_TILE
    for kind in ("fwd", "lat", "bwd"):
        assert P.rowblock_tile(kind, 4096, 4096, r_pad, dtype, True, strided_cols=True) == tile
        assert P.rowblock_tile(kind, 4096, 4096, r_pad, dtype, True) != tile or r_pad == 128
    assert P.split_d_tile(8, 4096, r_pad, dtype, True, strided_cols=True) == tile
    block_d, warps, _ = P.resident_tile(16, 4096, r_pad, dtype, strided_cols=True)
    assert (block_d, warps) == tile[1:]
    assert P.strided(1, 1) is False and P.strided(1, 4096) is True
