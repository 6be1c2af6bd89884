"""Import interventions trained with pyreft 0.1.0 (saved by ``ReftModel.save(dir)``, i.e. pyvene's
``IntervenableModel.save``) into a model: ``load_pyreft(model, directory, ...)``.

What pyreft writes (pyvene 0.1.6 .. 0.1.8):

- ``config.json``: a transformers ``PretrainedConfig`` JSON. Fields read here:
  ``sorted_keys`` (the intervention keys), ``intervention_types`` (one ``str(type(iv))`` per key, in
  the same order, e.g. ``"<class 'pyreft.interventions.LoreftIntervention'>"``) and
  ``representations`` (one JSON list per key: pyvene's ``RepresentationConfig`` namedtuple, whose
  first fields are layer, component, unit, max_number_of_units, low_rank_dimension).
- ``intkey_<key>.bin`` per intervention: ``torch.save`` of its ``state_dict()``. Keys are
  ``layer_<l>_comp_<c>_unit_<u>_nunit_<n>#<k>`` (pyvene 0.1.7+) or
  ``layer.<l>.comp.<c>.unit.<u>.nunit.<n>#<k>`` (0.1.6 and before); ``#k`` counts repeats of one
  site. pyreft's scripts list every layer twice when weights are not shared, first-position
  interventions first: ``#0`` is the shared (or first-positions) intervention, ``#1`` the
  last-positions one.

State dicts (d hidden size, r rank; ``U`` is pyreft's ``rotate_layer.weight``, (d, r), orthonormal
columns, so our ``R = U^T``, (r, d), orthonormal rows):

- ``LoreftIntervention`` overrides ``state_dict``: ``weight`` (r, d), ``bias`` (r,) (its
  ``learned_source`` Linear, bf16 unless pyreft was given a dtype) and ``rotate_layer`` = U (fp32).
- The other five keep ``nn.Module``'s: ``learned_source.weight`` / ``.bias`` (a Linear; for
  ``Consreft`` / ``Lobireft`` a bare (r,) parameter ``learned_source``), ``proj_layer.weight`` /
  ``.bias`` (NoReFT / NodiReFT; the bias only with ``add_bias``), the 0-d buffers ``embed_dim`` and
  ``interchange_dim``, and U behind ``torch.nn.utils.parametrizations.orthogonal`` as
  ``rotate_layer.parametrizations.weight.original`` (d, r) and ``...weight.0.base`` (d, d). U is
  rebuilt by registering the same parametrization on a (d, r) weight and loading both tensors, so
  torch computes exactly what pyreft's module computes.

Mapping: ``methods.METHODS`` gives, per method, pyreft's class (``pyreft``), the state-dict key of
each parameter (``pyreft_keys``) and the attribute of our module that takes it (``attrs``); R is
loaded as U^T with ``load_R_``. NoReFT's ``add_bias`` is whether the file has ``proj_layer.bias``;
NodiReFT's ``proj_layer.bias`` (saved with ``add_bias``, never used by pyreft) is checked and
dropped (``pyreft_unused``). ``act`` wraps the ``W h + b`` term where pyreft has ``act_fn``.

Components: pyvene's names that ``ReftConfig(component=...)`` has sites for
(``config.COMPONENTS``) load as that component: ``block_output`` (the residual stream after layer
``l``, (B, S, d)), ``block_input`` (the layer's input hidden states), ``mlp_output`` and
``attention_output`` (the outputs of the layer's MLP and self-attention before the residual add,
as pyvene maps them; the model types of ``sites.REFT_COMPONENT_SITES``). Other pyvene components (``mlp_input``,
``attention_input``, ``mlp_activation``, the query/key/value and head components) and components
given as a module path raise ValueError naming the key; so do folders mixing components (one
``ReftConfig`` is attached per folder). Units must be ``pos`` with one unit. pyreft saves no
positions, activation or dropout: the caller passes them (pyreft's ConsReFT has no dropout).

Everything is read and checked before the model is touched; on any error the model is left
exactly as it was.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from ..methods import METHODS, PYREFT_TYPES
from .attach import get_reft_model
from .config import COMPONENTS, ReftConfig
from .sites import REFT_COMPONENT_SITES, find_sites, hidden_size, model_type

CONFIG_NAME = "config.json"

_BASE = "rotate_layer.parametrizations.weight.0.base"
_BUFFERS = ("embed_dim", "interchange_dim")

# pyvene keys: ``layer_3_comp_block_output_unit_pos_nunit_1#0`` (0.1.7+) or
# ``layer.3.comp.block_output.unit.pos.nunit.1#0`` (0.1.6); one separator throughout
_KEY = re.compile(r"^layer(?P<s>[._])(?P<layer>\d+)(?P=s)comp(?P=s)(?P<comp>.+?)(?P=s)unit(?P=s)(?P<unit>.+?)"
                  r"(?P=s)nunit(?P=s)(?P<nunit>\d+)#(?P<k>\d+)$")
# a component given as a module path (pyvene then leaves the layer out of the key)
_COMP_KEY = re.compile(r"^comp[._](?P<comp>.+?)[._]unit[._].+#\d+$")


def _class_name(type_str):
    """``"<class 'pyreft.interventions.LoreftIntervention'>"`` -> ``"LoreftIntervention"``."""
    if not isinstance(type_str, str):
        return None
    s = type_str.strip()
    m = re.fullmatch(r"<class '([\w.]+)'>", s)
    if m:
        s = m.group(1)
    return s.rsplit(".", 1)[-1]


def _rep_field(rep, index, name):
    """Field ``name`` (position ``index`` of pyvene's RepresentationConfig) of a saved representation
    (a list, or a dict), or None."""
    if isinstance(rep, dict):
        return rep.get(name)
    if isinstance(rep, (list, tuple)) and len(rep) > index:
        return rep[index]
    return None


def _read_config(directory):
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise ValueError(f"no pyreft interventions at {directory!r}: not a directory")
    if not os.path.isfile(path):
        raise ValueError(f"no pyreft interventions at {directory!r}: {CONFIG_NAME} is missing")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a pyvene IntervenableConfig (a JSON object)")
    types = meta.get("intervention_types")
    keys = meta.get("sorted_keys")
    if keys is None:
        # a config without its key list: take the files present (a single type is then required)
        suffix = ".bin"
        keys = sorted(n[len("intkey_"):-len(suffix)] for n in os.listdir(directory)
                      if n.startswith("intkey_") and n.endswith(suffix))
        if isinstance(types, list) and len({str(t) for t in types}) == 1:
            types = types[0]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: 'sorted_keys' must be a non-empty list of intervention keys, got {keys!r}")
    if isinstance(types, str):
        types = [types] * len(keys)
    if not isinstance(types, list) or len(types) != len(keys):
        raise ValueError(f"{path}: 'intervention_types' must list one type per key ({len(keys)} keys), "
                         f"got {types!r}")
    reps = meta.get("representations")
    if not isinstance(reps, list) or len(reps) != len(keys):
        reps = [None] * len(keys)
    return path, keys, types, reps


def _unsupported_component(path, key, comp):
    """The ValueError for an intervention on a component that has no ``ReftConfig`` site."""
    return ValueError(f"{path}: intervention {key!r} is on component {comp!r}; supported components: "
                      f"{list(COMPONENTS)} (pyvene's names)")


def _parse_key(key, rep, path):
    """(layer, k, component) of a pyvene key; ValueError for a component without a ``ReftConfig``
    site (``COMPONENTS``), a component given as a module path, or a unit other than one ``pos``."""
    m = _KEY.match(key)
    rep_comp = _rep_field(rep, 1, "component")
    if m is None:
        mc = _COMP_KEY.match(key)
        comp = rep_comp if rep_comp is not None else (mc.group("comp") if mc else None)
        if comp is not None:
            if comp in COMPONENTS:
                raise ValueError(f"{path}: intervention {key!r} on component {comp!r} has no layer in its key "
                                 "(layer_<l>_comp_<c>_unit_<u>_nunit_<n>#<k>)")
            raise ValueError(f"{path}: intervention {key!r} is on component {comp!r}, a module path or an unknown "
                             f"name; supported components: {list(COMPONENTS)} (pyvene's names)")
        raise ValueError(f"{path}: {key!r} is not a pyvene intervention key "
                         "(layer_<l>_comp_<c>_unit_<u>_nunit_<n>#<k> or layer.<l>.comp.<c>.unit.<u>.nunit.<n>#<k>)")
    comp = m.group("comp")
    if comp not in COMPONENTS:
        raise _unsupported_component(path, key, comp)
    if rep_comp is not None and rep_comp != comp:
        if rep_comp not in COMPONENTS:
            raise _unsupported_component(path, key, rep_comp)
        raise ValueError(f"{path}: key {key!r} names component {comp!r} but its representation says {rep_comp!r}")
    if m.group("unit") != "pos" or m.group("nunit") != "1":
        raise ValueError(f"{path}: intervention {key!r} has unit {m.group('unit')!r} x {m.group('nunit')}; only "
                         "unit 'pos' with one unit is supported")
    layer = int(m.group("layer"))
    rep_layer = _rep_field(rep, 0, "layer")
    if rep_layer is not None and rep_layer != layer:
        raise ValueError(f"{path}: key {key!r} names layer {layer} but its representation says layer {rep_layer!r}")
    return layer, int(m.group("k")), comp


def _load_state(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing ({CONFIG_NAME} lists this intervention)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ValueError(f"{path} is not a readable torch.save state dict: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _rotation_from_parametrization(original, base):
    """pyreft's ``rotate_layer.weight`` (d, r), rebuilt in float64 by torch's own
    ``parametrizations.orthogonal`` from its saved ``original`` (and ``base``, when it uses the
    trivialization, as pyreft does)."""
    d, r = original.shape
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.eye(d, r, dtype=torch.float64))
    with torch.random.fork_rng(devices=[]):  # registering completes a basis with torch.randn
        nn.utils.parametrizations.orthogonal(holder, use_trivialization=base is not None)
    state = {"parametrizations.weight.original": original.to(torch.float64)}
    if base is not None:
        state["parametrizations.weight.0.base"] = base.to(torch.float64)
    holder.load_state_dict(state)
    with torch.no_grad():
        return holder.weight.detach().clone()


class _Shapes:
    """Checks a state dict's tensors against the (r, d) found so far, naming file and key."""

    def __init__(self, path, state, allow_nonfinite=False):
        self.path, self.state, self.r, self.d = path, state, None, None
        self.allow_nonfinite = allow_nonfinite

    def get(self, name, dims, optional=False):
        t = self.state.get(name)
        if t is None:
            if optional:
                return None
            raise ValueError(f"{self.path}: key {name!r} is missing (found {sorted(self.state)})")
        if not t.is_floating_point():
            raise ValueError(f"{self.path}: {name!r} has dtype {t.dtype}, expected floating point")
        if not self.allow_nonfinite:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{self.path}: {name!r} holds {bad} NaN or Inf value(s) of {t.numel()}; "
                                 "pass allow_nonfinite=True to load it anyway")
        if t.dim() != len(dims):
            raise ValueError(f"{self.path}: {name!r} has shape {tuple(t.shape)}, expected {len(dims)} dims "
                             f"({', '.join(dims)})")
        for size, dim in zip(t.shape, dims):
            known = getattr(self, dim)
            if known is None:
                setattr(self, dim, int(size))
            elif known != size:
                raise ValueError(f"{self.path}: {name!r} has shape {tuple(t.shape)}, inconsistent with "
                                 f"{dim} = {known} from the other tensors of the file")
        return t


def _extract(method, state, path, allow_nonfinite=False):
    """({our module's attribute: tensor}, U (d, r) float64 or None, add_bias, r, d) of one file,
    read as ``methods.METHODS[method]`` lays it out; ValueError for a tensor holding NaN or Inf
    unless ``allow_nonfinite``."""
    spec = METHODS[method]
    s = _Shapes(path, state, allow_nonfinite)
    params, used = {}, set()
    attr = dict(zip(spec.params, spec.attrs))
    key = dict(zip(spec.params, spec.pyreft_keys))

    def take(theirs, dims, optional=False):
        used.add(theirs)
        return s.get(theirs, dims, optional)

    U = None
    for p in (spec.A, spec.a, spec.B, spec.c):  # pyreft's learned source, then its projection
        if p is None:
            continue
        if spec.orthonormal and p == spec.B:  # R, saved as pyreft's U = R^T (d, r)
            if spec.pyreft_plain_state:
                U = take(key[p], ("d", "r")).to(torch.float64)
            else:
                original = take(key[p], ("d", "r"))
                base = take(_BASE, ("d", "d"), optional=True)
                U = _rotation_from_parametrization(original, base)
            continue
        t = take(key[p], spec.dims(p), optional=p in spec.optional)
        if t is not None:
            params[attr[p]] = t
    add_bias = not spec.add_bias or attr[spec.c] in params  # NoReFT: whether the file has b2
    for name in spec.pyreft_unused:
        take(name, ("r",), optional=True)
    if not spec.pyreft_plain_state:
        for name in _BUFFERS:
            if name in state:
                used.add(name)
                v = state[name]
                if s.d is not None and v.numel() == 1 and int(v.item()) != s.d:
                    raise ValueError(f"{path}: {name!r} = {int(v.item())} but the tensors have d = {s.d}")
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{path}: unexpected keys {extra} for a pyreft {method} intervention "
                         "(is intervention_types in config.json right?)")
    if s.r > s.d:
        raise ValueError(f"{path}: rank {s.r} exceeds the hidden size {s.d}")
    if U is not None:
        _check_orthonormal(U, state[key[spec.B]].dtype, path)
    return params, U, add_bias, s.r, s.d


def _check_orthonormal(U, saved_dtype, path):
    """pyreft's U must have orthonormal columns: our modules re-orthonormalise R, so any other U
    would give a different edit than pyreft's (e.g. a trained ``original`` whose diagonal decayed
    below 1 in magnitude: torch's Householder map truncates it with ``.int()`` to 0, zeroing a
    column)."""
    gram = U.t() @ U
    err = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()
    tol = 3e-2 if saved_dtype in (torch.float16, torch.bfloat16) else 1e-3
    if not err <= tol:
        raise ValueError(f"{path}: the rotation's columns are not orthonormal (max |U^T U - I| = {err:.3g}); "
                         "pyreft's edit with it cannot be reproduced by an orthonormal R")


def load_pyreft(model, directory, *, positions="f7+l7", share_weights=None, act=None, dropout=0.0,
                backend=None, verbose=False, allow_nonfinite=False):
    """Attach the interventions that pyreft 0.1.0 saved in ``directory`` (``ReftModel.save``) to
    ``model`` with ``get_reft_model`` and load their weights, so that the patched model computes
    what pyreft's ``ReftModel`` computes at the same positions and component (``block_output``,
    ``block_input``, ``mlp_output`` or ``attention_output``, from the keys). Returns ``model``.

    The method comes from ``intervention_types``; layers, rank, hidden size and (NoReFT)
    ``add_bias`` from the files; ``share_weights`` from whether ``#1`` keys exist (None), or is
    checked against them. pyreft saves no positions, activation or dropout: pass them (``act`` as
    pyreft's ``act_fn``, a transformers ``ACT2FN`` name; None = identity). The parameters take the
    model's dtype (R stays fp32).

    Raises ValueError, naming the file or key, for a missing ``config.json`` or intervention file,
    an unreadable file, an unknown or mixed intervention type, a component without a
    ``ReftConfig`` site (or mixed components, or one this model type has no site for), a hidden
    size or layer the model does not have, or a ``share_weights`` that
    contradicts the files, or a tensor holding NaN or Inf (unless ``allow_nonfinite=True``; a
    rotation with NaN or Inf still fails the orthonormality check); on any error the model is
    left exactly as it was.
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
    if share_weights is not None and not isinstance(share_weights, bool):
        raise TypeError(f"share_weights must be None or a bool, got {type(share_weights).__name__}")
    directory = os.fspath(directory)
    cpath, keys, types, reps = _read_config(directory)

    # --- what the files hold (nothing depends on the model yet)
    methods, components = {}, {}
    sites = {}  # (layer, k) -> key
    for key, type_str, rep in zip(keys, types, reps):
        name = _class_name(type_str)
        if name not in PYREFT_TYPES:
            raise ValueError(f"{cpath}: intervention {key!r} has type {type_str!r}; supported: "
                             f"{sorted('pyreft.interventions.' + n for n in PYREFT_TYPES)}")
        methods.setdefault(PYREFT_TYPES[name], []).append(key)
        layer, k, component = _parse_key(key, rep, cpath)
        components.setdefault(component, []).append((layer, k, key))
    if len(methods) > 1:
        raise ValueError(f"{cpath}: the interventions mix types {sorted(methods)}; load_pyreft attaches one "
                         "method per directory")
    method = next(iter(methods))
    if len(components) > 1:
        examples = ", ".join(f"{c!r} ({ks[0][2]!r})" for c, ks in sorted(components.items()))
        raise ValueError(f"{cpath}: the interventions mix components {examples}; load_pyreft attaches one "
                         "component per directory")
    component, parsed = next(iter(components.items()))
    for layer, k, key in parsed:
        if (layer, k) in sites:
            raise ValueError(f"{cpath}: keys {sites[(layer, k)]!r} and {key!r} name the same site")
        sites[(layer, k)] = key
    layers = sorted({layer for layer, _ in sites})
    for (layer, k), key in sorted(sites.items()):
        if k > 1:
            raise ValueError(f"{cpath}: {key!r} is a third intervention on layer {layer}; pyreft's layouts have "
                             "one per layer (shared) or two (#0 first positions, #1 last positions)")
    unshared = {layer for layer, k in sites if k == 1}
    if unshared and unshared != set(layers):
        lone = sorted(set(layers) - unshared)
        raise ValueError(f"{cpath}: layers {sorted(unshared)} have separate first/last interventions (#1 keys) "
                         f"but layers {lone} do not; pyreft's share_weights applies to every layer")
    files_share = not unshared
    if share_weights is None:
        share_weights = files_share
    elif share_weights != files_share:
        example = sites[(layers[0], 1)] if unshared else sites[(layers[0], 0)]
        what = ("separate first- and last-position interventions (#1 keys, e.g. "
                if unshared else "one intervention per layer (no #1 keys, e.g. ")
        raise ValueError(f"{directory!r} holds {what}{example!r}), but share_weights={share_weights} was passed")
    spec = METHODS[method]
    if not spec.pyreft_dropout and dropout:
        raise ValueError(f"pyreft's {spec.pyreft} applies no dropout; pass dropout=0.0 to reproduce it")

    loaded = {}  # (layer, k) -> (params, U, path)
    rank = d = add_bias = None
    for (layer, k), key in sorted(sites.items()):
        path = os.path.join(directory, f"intkey_{key}.bin")
        params, U, bias_here, r_here, d_here = _extract(method, _load_state(path), path, allow_nonfinite)
        if rank is None:
            rank, d, add_bias = r_here, d_here, bias_here
        elif (r_here, d_here) != (rank, d):
            raise ValueError(f"{path}: rank {r_here}, hidden size {d_here}; the other files have rank {rank}, "
                             f"hidden size {d}")
        elif spec.add_bias and bias_here != add_bias:
            raise ValueError(f"{path}: proj_layer.bias is {'present' if bias_here else 'absent'} here but not in "
                             "the other files (pyreft's add_bias is one setting)")
        loaded[(layer, k)] = (params, U, path)

    # --- against the model
    d_model = hidden_size(model)
    if d != d_model:
        path = loaded[min(loaded)][2]
        raise ValueError(f"{path}: saved for hidden size {d}, but the model's hidden size is {d_model}")
    table = REFT_COMPONENT_SITES[component]
    if model_type(model) not in table:
        raise ValueError(f"{cpath}: the interventions are on component {component!r}, which has no built-in sites "
                         f"for model type {model_type(model)!r}; supported: {sorted(table)}")
    found, n_layers = find_sites(model, ReftConfig(layers="all"), table, "load_pyreft")
    present = {layer for _, layer, _, _ in found}
    for (layer, k), (_, _, path) in sorted(loaded.items()):
        if layer not in present:
            raise ValueError(f"{path}: layer {layer} does not exist in this model (it has layers "
                             f"{min(present)}..{max(present)}, {n_layers} in all)")
    config = ReftConfig(method=method, layers=layers, rank=rank, positions=positions,
                        share_weights=share_weights, act=act, dropout=dropout,
                        add_bias=add_bias if spec.add_bias else True, backend=backend, component=component)

    # --- attach and load; undo the attach on any failure
    get_reft_model(model, config, verbose=verbose)
    try:
        group = model.reft_interventions[0]
        with torch.no_grad():
            for (layer, k), (params, U, _) in loaded.items():
                name = f"layer{layer}" if share_weights else f"layer{layer}_{'first' if k == 0 else 'last'}"
                iv = group[name]
                for pname, t in params.items():
                    getattr(iv, pname).copy_(t)
                if U is not None:
                    iv.load_R_(U.t())
    except BaseException:
        model.reft.remove()
        raise
    if verbose:
        print(f"loaded {len(loaded)} pyreft {method} intervention(s) from {directory}: {component} of layers "
              f"{layers}, rank {rank}, {'shared' if share_weights else 'separate first/last'} weights")
    return model
