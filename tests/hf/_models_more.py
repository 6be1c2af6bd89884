"""Tiny random-weight models of the newer architectures (Qwen3, Gemma 2, Gemma 3 text, Phi-3, and
Mixtral as the mixture-of-experts model), built from configs like ``_models.py``'s, with the module
names of their RED and ReFT sites written out here (not read from ``reft_kernels.hf.sites``)."""
from __future__ import annotations

import pytest
import torch

from ._models import D, VOCAB

transformers = pytest.importorskip("transformers")

# arch -> (config class, causal LM class) names in transformers
_CLASSES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}
NEW_ARCHS = tuple(_CLASSES)

# RED's site per layer: the MLP's output projection, or the whole sparse MoE block (Mixtral)
RED_NAMES = {arch: "model.layers.{}.mlp.down_proj" for arch in NEW_ARCHS}
RED_NAMES["mixtral"] = "model.layers.{}.mlp"


def _extra(arch: str) -> dict:
    if arch in ("qwen3", "gemma2", "gemma3_text"):
        return {"head_dim": 8}
    if arch == "mixtral":  # the experts' eager loop: the grouped-matmul kernel has no float64
        return {"num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"}
    return {}


def new_arch_classes(arch: str):
    """(config class, model class); skips the test when this transformers lacks them."""
    cfg_name, model_name = _CLASSES[arch]
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, model_name, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    return cfg_cls, model_cls


def tiny_new_model(arch: str, n_layers: int = 3, dtype=torch.float64, seed: int = 0):
    """A tiny causal LM of ``arch`` in eval mode on the CPU."""
    cfg_cls, model_cls = new_arch_classes(arch)
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **_extra(arch))
    if arch == "mixtral":
        cfg._experts_implementation = "eager"
    return model_cls(cfg).to(dtype).eval()
