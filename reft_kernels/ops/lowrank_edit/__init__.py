"""The low-rank edit ``y = h + (act(h A^T + a) - h C^T - c) B``: one file per backend, the contract
they share (``contract.py``) and the autograd Function (``function.py``). The public functions
are ``reft_kernels.lowrank_edit`` / ``lowrank_edit_`` (``reft_kernels/functional.py``)."""
