"""Tiny random-weight ``transformers`` models of each supported architecture, built from configs
(no hub), and small batch builders shared by the Hugging Face tests."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
D = 32

# architecture -> (builder, layer-list path, RED site suffix); dropout off so outputs are
# deterministic in train mode
ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "t5")
REFT_ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert", "roberta")
CAUSAL_ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(arch: str, n_layers: int = 3):
    T = transformers
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[arch]
        return cls(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=n_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=n_layers, n_head=4, n_positions=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch in ("bert", "roberta"):
        cls = T.BertConfig if arch == "bert" else T.RobertaConfig
        return cls(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=n_layers,
                   num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=3)
    if arch == "t5":
        return T.T5Config(vocab_size=VOCAB, d_model=D, d_ff=2 * D, d_kv=8, num_layers=n_layers, num_heads=4,
                          dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, n_layers: int = 3, dtype=torch.float32, seed: int = 0):
    """A tiny model with a head: causal LM (LLaMA family, GPT-2), sequence classification (BERT,
    RoBERTa), seq2seq LM (T5). Returned in eval mode, on the CPU, in ``dtype``."""
    T = transformers
    torch.manual_seed(seed)
    cfg = tiny_config(arch, n_layers)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM}[arch]
    elif arch == "gpt2":
        cls = T.GPT2LMHeadModel
    elif arch == "bert":
        cls = T.BertForSequenceClassification
    elif arch == "roberta":
        cls = T.RobertaForSequenceClassification
    else:
        cls = T.T5ForConditionalGeneration
    model = cls(cfg).to(dtype)
    return model.eval()


def layers_of(model):
    """The list of decoder/encoder layers whose outputs ReFT edits."""
    for path in ("model.layers", "transformer.h", "bert.encoder.layer", "roberta.encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(type(model).__name__)


def padded_batch(lengths, seq: int, side: str, seed: int = 0):
    """(input_ids, attention_mask) with the given real lengths, padded on ``side``; token ids in
    [3, VOCAB) so they never collide with pad/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[b, span] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, span] = 1
    return ids, mask


def model_inputs(arch: str, ids, mask):
    """Keyword inputs of one forward for ``arch`` (T5 gets decoder inputs too)."""
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = ids[:, :4]
    return kw


def main_output(out):
    return out.logits


# words of the tiny tokenizer's vocabulary, ids 4 .. 63 (0 pad, 1 bos, 2 eos, 3 unk)
WORDS = (
    "the a an cat dog bird fish tree house car road sky sun moon star rain snow wind fire water "
    "red blue green black white big small old new good bad hot cold fast slow one two three four "
    "five is are was has runs sees eats likes and or not to of in on at with what who how"
).split()


def tiny_tokenizer(padding_side: str = "right"):
    """A real ``PreTrainedTokenizerFast`` built offline: whole-word vocabulary (``WORDS``, ids 4..63
    < ``VOCAB``), ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3 (the tiny models' special ids);
    a whitespace pre-tokenizer; BOS prepended when ``add_special_tokens=True``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    assert len(vocab) == VOCAB, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                padding_side=padding_side)


def tiny_unsupported_model(n_layers: int = 2, dtype=torch.float32, seed: int = 0):
    """A tiny OPT causal LM: a model type the built-in site tables do not list. Its MLP output
    projection is ``model.decoder.layers.N.fc2``, its layers ``model.decoder.layers.N``."""
    T = transformers
    torch.manual_seed(seed)
    cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=D, ffn_dim=2 * D, num_hidden_layers=n_layers,
                      num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=D,
                      dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.OPTForCausalLM(cfg).to(dtype).eval()


def device_for(backend: str) -> torch.device:
    """Where a test runs ``backend``: on a GPU machine the Triton (and CUDA) kernels take CUDA
    tensors; on a CPU machine Triton runs through its interpreter on CPU tensors."""
    return torch.device("cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu")


def to_device(kw: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
