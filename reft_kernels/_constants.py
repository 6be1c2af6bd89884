"""Constants shared by Python, the Triton kernels and the CUDA C++ extension, defined once here.

The extension exports its own copies (``reft_kernels._C.MAX_RANK``, ``NUM_ACTIVATIONS``), and
``reft_kernels._cuda.extension()`` refuses a build whose values differ from these (a stale build
of an older source), so the two languages cannot drift apart silently.
"""

# Activation codes (``act``): compile-time constants of the Triton kernels (``ACT: tl.constexpr``)
# and the ``ActCode`` enum of ``csrc/reft_device.cuh``.
IDENTITY, RELU, GELU, GELU_TANH, SILU, TANH, SIGMOID = range(7)
NUM_ACTIVATIONS = 7

# The CUDA kernels keep the (rows, r) latents of a row group in shared memory sized for this rank
# (``kMaxRank`` in csrc/launch.h).
CUDA_MAX_RANK = 64
