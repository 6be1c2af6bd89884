"""The CUDA kernels that ``reft_kernels.kernels(...)`` selects, on a GPU (skipped without one or
without the built extension; on the CPU, test_cuda_emulated.py runs the same cases through the
emulation): the 16-byte parameter-gradient kernel (``cuda_params="vector"``) and the split finish
of the partial sums (``cuda_finish="split"``), each against the float64 reference with every
gradient, beside the previous kernels (mode "previous"). Shapes up to a few thousand rows,
so that a real GPU plans many row blocks (and the split finish its longest trees).
"""
from __future__ import annotations

import pytest
import torch

from reft_kernels import _cuda

from . import kernel_mode_cases as km

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _cuda.extension_available()),
                                reason="needs a GPU and the built extension reft_kernels._C")

DEV = torch.device("cuda")
ALL_MODES = list(km.MODES)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("r", km.RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ranks(mode, tied, r, dtype):
    with km.modes(mode):
        km.check_lowrank(DEV, 257 if dtype == torch.float32 else 100, r, km.LOREFT if tied else km.NOREFT_GELU,
                         dtype=dtype, lead=(8, 33), layout="padded", g_layout="padded")


@pytest.mark.parametrize("mode", ["previous", "vector_split"])
@pytest.mark.parametrize("dtype,p_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16)],
                         ids=["fp16", "bf16_h_fp32_p", "fp32_h_bf16_p"])
@pytest.mark.parametrize("d", [64, 7, 4096])
def test_dtypes(mode, dtype, p_dtype, d):
    with km.modes(mode):
        km.check_lowrank(DEV, d, 8, km.LOREFT, dtype=dtype, p_dtype=p_dtype, lead=(16, 64))


@pytest.mark.parametrize("mode", ["previous", "vector_split"])
@pytest.mark.parametrize("layout,lead,g_layout", [
    ("contiguous", (3, 5), "unaligned"), ("contiguous", (3, 5), "strided"), ("sliced_cols", (15,), None),
    ("strided_cols", (4, 4), None), ("col_major", (13,), None), ("transposed", (3, 5), None),
], ids=["g_unaligned", "g_strided", "x_sliced", "x_strided", "x_col_major", "transposed"])
@pytest.mark.parametrize("family", ["loreft", "noreft_gelu"])
def test_scalar_paths(mode, layout, lead, g_layout, family):
    with km.modes(mode):
        km.check_lowrank(DEV, 40, 5, km.LOREFT if family == "loreft" else km.NOREFT_GELU, layout=layout, lead=lead,
                         g_layout=g_layout)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_index_with_padding(mode, dtype):
    with km.modes(mode):
        km.check_lowrank(DEV, 1000, 9, km.NOREFT_GELU, dtype=dtype, lead=(32, 40), mode="inplace_index")


@pytest.mark.parametrize("wanted", ["B", "A", "C", "h"])
def test_partial_requires_grad(wanted):
    with km.modes("vector_split"):
        km.check_lowrank(DEV, 48, 5, km.NOREFT_GELU, lead=(20,), wanted=wanted)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace_index"])
def test_many_row_blocks_deterministic(mode, inplace):
    with km.modes(mode):
        km.check_lowrank_deterministic(DEV, n=8192, d=256, r=8, inplace=inplace)


@pytest.mark.parametrize("mode", ["previous", "split"])
@pytest.mark.parametrize("n,d,dtype", [(16384, 512, torch.bfloat16), (8192, 48, torch.float32),
                                       (3000, 4100, torch.float32)])
def test_red_deterministic(mode, n, d, dtype):
    with km.modes(mode):
        km.check_red_deterministic(DEV, n=n, d=d, dtype=dtype)
