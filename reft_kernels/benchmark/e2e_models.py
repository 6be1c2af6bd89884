"""Models and providers of the end-to-end benchmark (``e2e.py`` times them).

Models: ``transformers.LlamaConfig`` shapes with random weights (seeded), or SmolLM2-135M-Instruct
(``reft_kernels.hf.smollm2.load()``, a 93 MB download on first use). ``use_cache=False``, train mode.

Providers, each a ``Setup`` holding one model copy, its optimizer and ``step()``:
- ``frozen``: no adapter. The step is the forward with labels and the backward of the loss down to
  the output of decoder layer 0, which a forward hook makes require grad: activation gradients
  through layers 1..L-1, the final norm and the head, no weight gradient, and no optimizer step
  (nothing to update). That is exactly the backward that ReFT or RED on every layer forces (both
  need the gradient at layer 0's output, or at its MLP output, which is the same tensor's gradient
  through the residual add) and no more, so ``overhead_pct`` is what the adapter itself costs.
  LoRA on layer 0's attention needs more (the backward of layer 0's attention): that is counted as
  LoRA's overhead. Making the input embeddings require grad instead (transformers'
  ``enable_input_require_grads``) would add layer 0's whole backward to the baseline, which none of
  the ReFT/RED adapters needs: on the CPU config that step costs 10% more (paired rounds), and RED
  measured 4% below it.
- ``naive``: the same interventions in eager PyTorch as pyvene/pyreft run them (``e2e_naive.py``).
- ``ours``: ``reft_kernels.hf.get_reft_model`` with the case's config.
- ``lora``: PEFT ``LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])``,
  ``task_type="CAUSAL_LM"``, PEFT's defaults otherwise (alpha 8, no dropout, adapter weights fp32).
Adapter steps: forward with labels (the loss over every token), backward, ``AdamW.step()``,
``zero_grad()`` (grads set to None). AdamW is fused (one kernel for all tensors, as the Trainer's
default ``adamw_torch_fused``) and runs with ``weight_decay=0`` (the Trainer's default, which
pyreft trains with): torch's orthogonal parametrization of a (d, r) weight (the Householder map)
multiplies by ``original.diagonal().int()``, so any decoupled weight decay (AdamW's own default is
0.01) moves that diagonal off +-1 and turns the naive R into zeros after the first step.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from .cases import DTYPES

PROVIDERS = ("frozen", "naive", "ours", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 8


@dataclass(frozen=True)
class ModelSpec:
    """A LLaMA-architecture model: a random-weight config, or ``source="smollm2"``."""
    name: str
    d: int = 0
    layers: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    vocab: int = 0
    dtype: str = "fp32"
    source: str = "random"


@dataclass(frozen=True)
class Case:
    """An adapter to compare: ``method`` "loreft" (with ``positions``) or "red", on every layer."""
    name: str
    method: str
    positions: str | None = None

    def config(self):
        from ..hf import REDConfig, ReftConfig
        if self.method == "red":
            return REDConfig(layers="all")
        return ReftConfig(method="loreft", layers="all", rank=RANK, positions=self.positions, share_weights=True)

    def label(self) -> str:
        return f"{self.method} {self.positions}" if self.positions else self.method


CASES = {
    "loreft_f7l7": Case("loreft_f7l7", "loreft", "f7+l7"),
    "loreft_all": Case("loreft_all", "loreft", "all"),
    "red": Case("red", "red"),
}


def build_base(spec: ModelSpec, device, seed: int = 0):
    """The base model of ``spec`` on ``device`` in its dtype, train mode, no KV cache."""
    import transformers

    device = torch.device(device)
    if spec.source == "smollm2":
        from ..hf import smollm2
        model, _ = smollm2.load(dtype=DTYPES[spec.dtype], device=device)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.d, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=4096, tie_word_embeddings=False)
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
        model.to(DTYPES[spec.dtype])
    model.config.use_cache = False
    return model.train()


def spec_of_model(name: str, model) -> ModelSpec:
    """The ModelSpec describing a loaded model (SmolLM2's shape, for the rows)."""
    c = model.config
    dtype = next(k for k, v in DTYPES.items() if v == next(model.parameters()).dtype)
    return ModelSpec(name, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
                     c.num_key_value_heads, c.vocab_size, dtype, "smollm2")


def batch(vocab: int, bsz: int, seq: int, device, seed: int = 1) -> dict:
    """A fixed batch: random token ids (no padding), the all-ones mask, labels = the ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (bsz, seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Setup:
    """One provider's model, optimizer and training step on a fixed batch."""

    def __init__(self, provider: str, case: Case | None, model, inputs: dict, optimizer=None):
        self.provider, self.case, self.model, self.inputs, self.optimizer = provider, case, model, inputs, optimizer
        self.last_loss = None

    def step(self):
        loss = self.model(**self.inputs).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in _unique(self.model.parameters()) if p.requires_grad)

    def resident_bytes(self) -> int:
        """Bytes of the parameters, buffers and optimizer state this setup keeps between steps."""
        tensors = list(_unique(self.model.parameters())) + list(_unique(self.model.buffers()))
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _require_grad_from_layer0(model):
    """Make decoder layer 0's output require grad: the backward then stops there."""
    def hook(module, args, output):
        (output if isinstance(output, torch.Tensor) else output[0]).requires_grad_(True)

    model.get_decoder().layers[0].register_forward_hook(hook)


def naive_locations(case: Case, bsz: int, seq: int, device):
    """The (B, P) positions the naive LoReFT hooks edit: the same ones ours derives from the mask."""
    from ..hf.positions import intervention_locations
    return intervention_locations(torch.ones(bsz, seq, dtype=torch.long, device=device), case.positions)


def make_setup(provider: str, case: Case | None, base, inputs: dict, *, lr: float = 1e-4, init=None) -> Setup:
    """A provider's Setup on a deep copy of ``base`` (the base itself is left untouched)."""
    model = copy.deepcopy(base)
    if provider == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        _require_grad_from_layer0(model)
        return Setup(provider, None, model, inputs)
    if provider == "lora":
        from peft import LoraConfig, get_peft_model
        with warnings.catch_warnings():  # transformers' deprecation notice for an attribute PEFT reads
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=RANK, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    elif provider == "naive":
        bsz, seq = inputs["input_ids"].shape
        loc = naive_locations(case, bsz, seq, inputs["input_ids"].device) if case.method == "loreft" else None
        from .e2e_naive import attach_naive
        attach_naive(model, case.method, rank=RANK, locations=loc, init=init)
    elif provider == "ours":
        from ..hf import get_reft_model
        get_reft_model(model, case.config(), verbose=False)
    else:
        raise ValueError(f"unknown e2e provider {provider!r}; choose from {PROVIDERS}")
    params = [p for p in _unique(model.parameters()) if p.requires_grad]
    # fused, as the Trainer's default and reft-kernels train: one kernel for all tensors (torch's
    # default on a CPU loops over them: about 8 launching calls per tensor)
    return Setup(provider, case, model, inputs, torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True))
