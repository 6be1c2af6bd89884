"""RED, ``y = h * scale + bias``: one file per backend and the autograd Function
(``function.py``). The public function is ``reft_kernels.red`` (``reft_kernels/functional.py``)."""
