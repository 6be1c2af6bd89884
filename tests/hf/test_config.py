"""REDConfig / ReftConfig: validation with clear errors, the JSON round trip, and what each config
builds."""
from __future__ import annotations

import json

import pytest
import torch

import reft_kernels as rk
from reft_kernels.hf import REDConfig, ReftConfig
from reft_kernels.hf.config import METHODS, config_from_dict


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"method": "lora"}, ValueError, "method must be one of"),
    ({"rank": 0}, ValueError, "rank must be a positive int"),
    ({"rank": 2.0}, ValueError, "rank must be a positive int"),
    ({"layers": "some"}, ValueError, "layers must be 'all'"),
    ({"layers": []}, ValueError, "at least one layer"),
    ({"layers": [1, 1]}, ValueError, "more than once"),
    ({"layers": [-1]}, ValueError, "non-negative"),
    ({"layers": 3}, TypeError, "layers must be 'all'"),
    ({"positions": "f7+x7"}, ValueError, "positions must be"),
    ({"positions": "l7", "share_weights": False}, ValueError, "share_weights=False needs"),
    ({"positions": "all", "share_weights": False}, ValueError, "share_weights=False needs"),
    ({"method": "consreft", "act": "gelu"}, ValueError, "has no activation"),
    ({"act": "swishy"}, ValueError, "act must be None or one of"),
    ({"dropout": 1.0}, ValueError, "dropout must be a float in"),
    ({"dropout": -0.1}, ValueError, "dropout must be a float in"),
    ({"add_bias": False}, ValueError, "only applies to 'noreft'"),
    ({"dtype": "int8"}, ValueError, "dtype must be one of"),
    ({"dtype": 3}, TypeError, "dtype must be None"),
    ({"pattern": "layers\\.\\d+$"}, ValueError, "needs a group"),
    ({"pattern": "layers\\.(\\d+"}, ValueError, "not a valid regular expression"),
])
def test_reft_config_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ReftConfig(**kwargs)


def test_red_config_rejects():
    with pytest.raises(ValueError, match="layers must be 'all'"):
        REDConfig(layers="first")
    with pytest.raises(ValueError, match="dtype must be one of"):
        REDConfig(dtype="int32")


@pytest.mark.parametrize("cfg", [
    REDConfig(),
    REDConfig(layers=[0, 2], dtype=torch.bfloat16, pattern=r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$", backend="torch"),
    ReftConfig(),
    ReftConfig(method="noreft", layers=(1, 3), rank=2, positions="F3+L2", share_weights=False, act="gelu",
               dropout=0.05, add_bias=False, dtype="torch.float16", backend="triton"),
])
def test_config_json_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert config_from_dict(data) == cfg
    assert type(config_from_dict(data)) is type(cfg)


def test_config_normalises_inputs():
    cfg = ReftConfig(method="LoReFT", layers=[2, 0], positions=" F7+l7 ", dtype=torch.bfloat16)
    assert (cfg.method, cfg.layers, cfg.positions, cfg.dtype) == ("loreft", (2, 0), "f7+l7", "bfloat16")
    assert cfg.torch_dtype is torch.bfloat16


def test_config_from_dict_rejects_unknown():
    with pytest.raises(ValueError, match="unknown config kind"):
        config_from_dict({"kind": "lora"})
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"kind": "red", "layers": "all", "alpha": 1})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_build_makes_the_method_module(method):
    cls = {"loreft": rk.LoReFT, "noreft": rk.NoReFT, "direft": rk.DiReFT, "nodireft": rk.NodiReFT,
           "consreft": rk.ConsReFT, "lobireft": rk.LoBiReFT}[method]
    act = "relu" if METHODS[method][1] else None
    iv = ReftConfig(method=method, rank=3, act=act).build(16, dtype=torch.float32, device="cpu")
    assert type(iv) is cls and (iv.d, iv.rank, iv.act) == (16, 3, act)


def test_noreft_add_bias_false_drops_the_projection_bias():
    iv = ReftConfig(method="noreft", rank=2, add_bias=False).build(8, dtype=torch.float32, device="cpu")
    assert iv.proj_bias is None
    assert ReftConfig(method="noreft", rank=2).build(8, dtype=torch.float32, device="cpu").proj_bias is not None
