"""Many adapters in one batch: RED and the low-rank edit with K adapters' parameters stacked and
one adapter id per row (-1: no edit). Public functions: ``reft_kernels.multi``.

Files: ``checks.py`` (the stacks and the adapter ids), ``torch_impl.py`` (PyTorch ops; the CPU
path and every backward), ``triton_impl.py`` (Triton forward kernels), ``function.py`` (the
autograd Functions)."""
