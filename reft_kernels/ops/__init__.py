"""The ops, a folder each: ``red/`` and ``lowrank_edit/``, each with one file per backend
(``triton_impl.py``, ``torch_impl.py``, ``cuda_impl.py``), the autograd Function
(``function.py``) and, for the low-rank edit, the written contract the backends follow
(``contract.py``). Nothing here is public API: the public functions live in
``reft_kernels/functional.py`` and share no name with these modules."""
