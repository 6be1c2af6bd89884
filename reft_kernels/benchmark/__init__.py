"""The benchmark runner behind ``reft-kernels bench``: every op against naive eager PyTorch and
``torch.compile`` of the same formulas, in one run, speed and memory side by side.

- ``cases.py``: what is measured (ops, ReFT method shapes, sizes) and each provider's callable.
- ``measure.py``: timing, peak memory, the device's copy bandwidth, the ops' minimal traffic.
- ``runner.py``: the sweep (correctness check, then timing), the CSV and the markdown table.
- ``e2e.py``: whole training steps of a LLaMA-architecture model with a frozen base
  (``reft-kernels bench --e2e``): no adapter, naive interventions, ours, PEFT LoRA; models and
  providers in ``e2e_models.py``, the naive pyvene-style hooks in ``e2e_naive.py``.
"""
