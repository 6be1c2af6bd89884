"""What to attach to a model: ``REDConfig`` (RED on the MLP output, every token) and
``ReftConfig`` (a ReFT intervention on the residual stream after chosen layers, at chosen token
positions). Both are frozen dataclasses that validate on construction and round-trip through
``to_dict`` / ``from_dict`` (the JSON written by ``save_interventions``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import methods as _methods
from .. import modules as _modules
from .._activations import ACTIVATION_NAMES
from .positions import parse_positions

# method name -> (module class, takes ``act``, takes ``add_bias``), from ``methods.METHODS``
METHODS = {m.name: (getattr(_modules, m.module), m.takes_act, m.add_bias) for m in _methods.METHODS.values()}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}

Layers = Union[str, Sequence[int]]

# where in each layer a ReFT intervention edits the residual stream (pyvene's component names)
COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")


def _check_layers(layers) -> Union[str, tuple]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer numbers, got {layers!r}")
        return layers
    try:
        out = tuple(layers)
    except TypeError:
        raise TypeError(f"layers must be 'all' or a list of layer numbers, got {type(layers).__name__}") from None
    if not out:
        raise ValueError("layers must name at least one layer, got an empty list")
    for x in out:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"layers must be non-negative ints, got {list(out)!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers lists a layer more than once: {list(out)!r}")
    return out


def _check_dtype(dtype) -> Optional[str]:
    """None or a floating dtype (a torch.dtype or its name); stored as its name."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise TypeError(f"dtype must be None, a torch.dtype or its name, got {type(dtype).__name__}")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


def _check_pattern(pattern):
    if pattern is None:
        return None
    import re
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a regular expression string, got {type(pattern).__name__}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise ValueError(f"pattern {pattern!r} needs a group that captures the layer number, "
                         r"e.g. r'(?:^|\.)layers\.(\d+)$'")
    return pattern


class _Config:
    kind = ""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(out.get("layers"), tuple):
            out["layers"] = list(out["layers"])
        return {"kind": self.kind, **out}

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}.from_dict got a config of kind {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return None if self.dtype is None else _DTYPES[self.dtype]


@dataclass(frozen=True)
class REDConfig(_Config):
    """RED (``y = h * scale + bias``) on the output of each chosen layer's MLP output projection,
    every token (padding and decode steps included), as RED's paper does.

    Args:
        layers: "all" or a list of layer numbers (for T5, both the encoder's and the decoder's
            blocks of those numbers).
        dtype: the parameters' dtype; None takes the edited layer's weight dtype (T5 keeps its
            ``wo`` in fp32, and so do the RED parameters there).
        pattern: a regular expression over module names (``model.named_modules()``) selecting the
            modules to edit, its last group the layer number; overrides the built-in site table,
            so it reaches model types the table does not list.
        backend: passed to the ops (None: the default dispatch).
    """

    layers: Layers = "all"
    dtype: Optional[str] = None
    pattern: Optional[str] = None
    backend: Optional[str] = None
    kind = "red"

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers))
        object.__setattr__(self, "dtype", _check_dtype(self.dtype))
        object.__setattr__(self, "pattern", _check_pattern(self.pattern))


@dataclass(frozen=True)
class ReftConfig(_Config):
    """A ReFT intervention on each chosen layer's hidden states at ``component`` (by default
    the residual stream after the layer, pyvene's ``block_output``), at the token positions
    ``positions`` of each prompt.

    Args:
        method: "loreft", "noreft", "direft", "nodireft", "consreft" or "lobireft".
        layers: "all" or a list of layer numbers.
        rank: the low rank r (1 <= r <= hidden size).
        positions: "f{k}+l{k}", "f{k}", "l{k}" or "all"; see ``reft_kernels.hf.positions``.
        share_weights: with "f+l" positions, one intervention per layer for both sides (True) or
            two, one for the first positions and one for the last (False).
        act: the activation of the learned source (None = identity); not for consreft/lobireft.
        dropout: applied as pyreft does, to the whole edited row ``h + edit`` in training.
        add_bias: NoReFT's projection bias (pyreft's ``add_bias``); only NoReFT has it.
        dtype: the parameters' dtype (None: the model's). R stays fp32 whatever the dtype.
        pattern: a regular expression over module names selecting the modules to edit, its last
            group the layer number (overrides the built-in site table); ``component`` then says
            whether their input ("block_input") or their output (the others) is edited.
        backend: passed to the ops (None: the default dispatch).
        component: pyvene's name of the edited hidden states: "block_output" (the layer's output,
            the default), "block_input" (the layer's input), "mlp_output" (the MLP's output
            before the residual add) or "attention_output" (the self-attention's output, after
            its output projection, before the residual add). Beyond "block_output" and
            "block_input", the built-in sites cover the LLaMA family, GPT-2 and the other
            decoder-only model types of ``sites.REFT_COMPONENT_SITES``; folders saved before this field
            existed load as "block_output".
    """

    method: str = "loreft"
    layers: Layers = "all"
    rank: int = 8
    positions: str = "f7+l7"
    share_weights: bool = True
    act: Optional[str] = None
    dropout: float = 0.0
    add_bias: bool = True
    dtype: Optional[str] = None
    pattern: Optional[str] = None
    backend: Optional[str] = None
    component: str = "block_output"
    kind = "reft"

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "method", self.method.lower())
        object.__setattr__(self, "layers", _check_layers(self.layers))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        spec = parse_positions(self.positions)
        object.__setattr__(self, "positions", self.positions.strip().lower())
        if not isinstance(self.share_weights, bool):
            raise TypeError(f"share_weights must be a bool, got {type(self.share_weights).__name__}")
        if not self.share_weights and (spec == "all" or 0 in spec):
            raise ValueError(f"share_weights=False needs positions with both sides ('f<k>+l<k>'), "
                             f"got {self.positions!r}")
        _, takes_act, takes_bias = METHODS[self.method]
        if self.act is not None:
            if not takes_act:
                raise ValueError(f"method {self.method!r} has no activation; act must be None, got {self.act!r}")
            if self.act not in ACTIVATION_NAMES:
                raise ValueError(f"act must be None or one of {ACTIVATION_NAMES}, got {self.act!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.add_bias, bool):
            raise TypeError(f"add_bias must be a bool, got {type(self.add_bias).__name__}")
        if not self.add_bias and not takes_bias:
            raise ValueError(f"add_bias=False only applies to 'noreft' (its projection bias); "
                             f"method {self.method!r} has no optional bias")
        object.__setattr__(self, "dtype", _check_dtype(self.dtype))
        object.__setattr__(self, "pattern", _check_pattern(self.pattern))
        if not isinstance(self.component, str):
            raise TypeError(f"component must be a string, one of {COMPONENTS}, got {type(self.component).__name__}")
        if self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {self.component!r}")

    @property
    def sides(self) -> tuple:
        """Intervention names per layer: ("",) shared, ("first", "last") unshared."""
        return ("",) if self.share_weights else ("first", "last")

    def build(self, d: int, *, dtype, device) -> torch.nn.Module:
        """One intervention module of this config for hidden size ``d``."""
        cls, takes_act, takes_bias = METHODS[self.method]
        kwargs = {"dtype": dtype, "device": device, "backend": self.backend}
        if takes_act:
            kwargs["act"] = self.act
        if takes_bias:
            kwargs["add_bias"] = self.add_bias
        return cls(d, self.rank, **kwargs)


def config_from_dict(data: dict):
    """The config (RED or ReFT) that ``to_dict`` wrote."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    for cls in (REDConfig, ReftConfig):
        if kind == cls.kind:
            return cls.from_dict(data)
    raise ValueError(f"unknown config kind {kind!r} (expected 'red' or 'reft')")


def as_configs(config_or_configs) -> tuple:
    """``config_or_configs`` (a REDConfig, a ReftConfig or a non-empty list of them) as a tuple;
    TypeError otherwise."""
    configs = config_or_configs
    if isinstance(configs, (REDConfig, ReftConfig)):
        configs = (configs,)
    if not isinstance(configs, (list, tuple)) or not configs:
        raise TypeError("get_reft_model takes a REDConfig, a ReftConfig or a non-empty list of them, "
                        f"got {type(config_or_configs).__name__}")
    for c in configs:
        if not isinstance(c, (REDConfig, ReftConfig)):
            raise TypeError(f"get_reft_model takes REDConfig / ReftConfig objects, got {type(c).__name__}")
    return tuple(configs)
