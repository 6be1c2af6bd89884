"""pyreft's six ReFT methods as terms of one low-rank edit: the single table of what each uses.

Every method is ``y = h + (act(h A^T + a) - h C^T - c) B`` (``lowrank_edit``) with its own
terms: B, A, C are (r, d) matrices and a, c are (r,) vectors, each either one of the method's
parameters or absent (None). ``act`` defaults to None (identity) for every method that takes it.

``METHODS`` maps our method name to a ``Method``; the functional ops (``interventions``), the
modules, ``hf.config``, ``hf.pyreft_import``, the benchmark's cases and the self-check read their
facts from it. ``reference``'s per-method formulas are written out independently, and
tests/test_methods.py checks this table against them. Plain Python: no torch at import.
"""
from __future__ import annotations

from dataclasses import dataclass

TERMS = ("B", "A", "a", "C", "c")  # in the order lowrank_edit(h, B, A, a, C, c) takes them


@dataclass(frozen=True)
class Method:
    """One ReFT method. The per-parameter tuples ``attrs`` and ``pyreft_keys`` line up with
    ``params``.

    name: ours; also the functional op (``reft_kernels.<name>``, in place ``<name>_``) and
        ``ReftConfig(method=...)``.
    module: the ``nn.Module`` class in ``reft_kernels.modules``.
    pyreft: pyreft's intervention class.
    params: the functional op's parameters after ``h``, in order.
    B, A, a, C, c: the parameter each ``lowrank_edit`` term is, or None (term left out).
    optional: parameters that may be None (NoReFT's ``b2``, the module's ``add_bias``).
    takes_act: whether ``act`` applies (the learned source ``h A^T + a``); default None.
    orthonormal: B (``R``) has orthonormal rows: the module stores ``rotation`` (r, d) and builds R
        from it (property ``R``), loading it with ``load_R_``.
    attrs: the module's attribute holding each parameter (``R``: the property).
    pyreft_keys: pyreft's ``state_dict`` key of each parameter (for R, where its U = R^T, (d, r),
        is saved).
    pyreft_plain_state: pyreft's class writes its own ``state_dict`` (U as a plain tensor, no
        buffers) instead of ``nn.Module``'s (U behind ``parametrizations.orthogonal``, buffers
        ``embed_dim`` / ``interchange_dim``).
    pyreft_unused: (r,) keys pyreft may save that its forward never reads.
    pyreft_dropout: whether pyreft applies dropout to the edited rows.
    """

    name: str
    module: str
    pyreft: str
    params: tuple
    B: str
    A: str | None
    a: str | None
    C: str | None
    c: str | None
    attrs: tuple
    pyreft_keys: tuple
    optional: tuple = ()
    takes_act: bool = True
    orthonormal: bool = False
    pyreft_plain_state: bool = False
    pyreft_unused: tuple = ()
    pyreft_dropout: bool = True

    @property
    def tied(self) -> bool:
        """C is B (one tensor read for both; its gradient sums both terms)."""
        return self.C is not None and self.C == self.B

    @property
    def add_bias(self) -> bool:
        """The module takes ``add_bias`` (keeps or drops the optional ``c``)."""
        return self.c is not None and self.c in self.optional

    def dims(self, param: str) -> tuple:
        """``("r", "d")`` for a matrix term (B, A, C), ``("r",)`` for a vector (a, c)."""
        return ("r", "d") if param in (self.B, self.A, self.C) else ("r",)

    def shapes(self, r: int, d: int) -> list:
        """The shape of each parameter, in ``params`` order."""
        size = {"r": r, "d": d}
        return [tuple(size[x] for x in self.dims(p)) for p in self.params]

    def terms(self, *values) -> tuple:
        """(B, A, a, C, c) for ``lowrank_edit`` from the parameters' ``values`` in ``params``
        order (a trailing optional one may be left out: None)."""
        named = dict(zip(self.params, values))
        return tuple(named.get(getattr(self, t)) for t in TERMS)

    def term_picker(self):
        """``terms`` with the table read once: a function of ``values + (None,)`` (the
        parameters' values in ``params`` order, then None, the slot of every absent term) that
        returns (B, A, a, C, c) by plain indexing, which torch.compile traces. For the per-call
        paths (the functional ops, the modules' forwards): 0.15 us per call against 1.0 us for
        ``terms`` (a dict and a generator per call) on the 2-core CPU."""
        none = len(self.params)
        b_, A_, a_, C_, c_ = (none if getattr(self, t) is None else self.params.index(getattr(self, t))
                              for t in TERMS)

        def pick(values):
            return values[b_], values[A_], values[a_], values[C_], values[c_]

        return pick


METHODS = {m.name: m for m in (
    # h + (act(h W^T + b) - h R^T) R
    Method("loreft", "LoReFT", "LoreftIntervention", ("R", "W", "b"),
           B="R", A="W", a="b", C="R", c=None, orthonormal=True,
           attrs=("R", "weight", "bias"), pyreft_keys=("rotate_layer", "weight", "bias"),
           pyreft_plain_state=True),
    # h + (act(h W1^T + b1) - (h W2^T + b2)) W2
    Method("noreft", "NoReFT", "NoreftIntervention", ("W2", "W1", "b1", "b2"),
           B="W2", A="W1", a="b1", C="W2", c="b2", optional=("b2",),
           attrs=("proj_weight", "weight", "bias", "proj_bias"),
           pyreft_keys=("proj_layer.weight", "learned_source.weight", "learned_source.bias", "proj_layer.bias")),
    # h + act(h W^T + b) R
    Method("direft", "DiReFT", "DireftIntervention", ("R", "W", "b"),
           B="R", A="W", a="b", C=None, c=None, orthonormal=True,
           attrs=("R", "weight", "bias"),
           pyreft_keys=("rotate_layer.parametrizations.weight.original", "learned_source.weight",
                        "learned_source.bias")),
    # h + act(h W1^T + b) W2
    Method("nodireft", "NodiReFT", "NodireftIntervention", ("W2", "W1", "b"),
           B="W2", A="W1", a="b", C=None, c=None,
           attrs=("proj_weight", "weight", "bias"),
           pyreft_keys=("proj_layer.weight", "learned_source.weight", "learned_source.bias"),
           pyreft_unused=("proj_layer.bias",)),
    # h + (b - h R^T) R
    Method("consreft", "ConsReFT", "ConsreftIntervention", ("R", "b"),
           B="R", A=None, a="b", C="R", c=None, takes_act=False, orthonormal=True,
           attrs=("R", "bias"), pyreft_keys=("rotate_layer.parametrizations.weight.original", "learned_source"),
           pyreft_dropout=False),
    # h + b R
    Method("lobireft", "LoBiReFT", "LobireftIntervention", ("R", "b"),
           B="R", A=None, a="b", C=None, c=None, takes_act=False, orthonormal=True,
           attrs=("R", "bias"), pyreft_keys=("rotate_layer.parametrizations.weight.original", "learned_source")),
)}

# pyreft's class name -> our method name
PYREFT_TYPES = {m.pyreft: m.name for m in METHODS.values()}
