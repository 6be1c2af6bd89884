"""pyreft's six interventions as thin calls of ``lowrank_edit``.

All matrices are (r, d) in ``nn.Linear`` convention. For the orthonormal methods ``R`` is the
paper's R, i.e. the transpose of pyreft's stored ``rotate_layer.weight`` (d, r); ``W``/``b`` (or
``W1``/``b1``) are pyreft's ``learned_source.weight`` / ``.bias``; ``W2``/``b2`` are
``proj_layer.weight`` / ``.bias``. pyreft applies its dropout to the whole output; these functions
compute the edit only. Which parameter is which term of ``lowrank_edit`` (B, A, a, C, c) is read
from ``methods.METHODS``.

Every function takes ``index`` (rows of ``h.reshape(-1, d)`` to edit, -1 = padding) and
``backend`` like ``lowrank_edit``; each has an in-place twin with a trailing underscore that edits
the listed rows of ``h`` itself (see ``lowrank_edit_``).
"""
from __future__ import annotations

from .functional import lowrank_edit, lowrank_edit_
from .methods import METHODS

_LOREFT, _NOREFT, _DIREFT, _NODIREFT, _CONSREFT, _LOBIREFT = (METHODS[n].term_picker() for n in (
    "loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"))


def loreft(h, R, W, b, *, act=None, index=None, backend=None):
    """LoReFT (pyreft ``LoreftIntervention``): ``h + (act(h W^T + b) - h R^T) R``, R orthonormal
    rows; R is both B and C (read once)."""
    return lowrank_edit(h, *_LOREFT((R, W, b, None)), act=act, index=index, backend=backend)


def noreft(h, W2, W1, b1, b2=None, *, act=None, index=None, backend=None):
    """NoReFT (pyreft ``NoreftIntervention``): ``h + (act(h W1^T + b1) - (h W2^T + b2)) W2``, no
    orthogonality; W2 is both B and C."""
    return lowrank_edit(h, *_NOREFT((W2, W1, b1, b2, None)), act=act, index=index, backend=backend)


def direft(h, R, W, b, *, act=None, index=None, backend=None):
    """DiReFT (pyreft ``DireftIntervention``): ``h + act(h W^T + b) R``, R orthonormal rows."""
    return lowrank_edit(h, *_DIREFT((R, W, b, None)), act=act, index=index, backend=backend)


def nodireft(h, W2, W1, b, *, act=None, index=None, backend=None):
    """NodiReFT (pyreft ``NodireftIntervention``): ``h + act(h W1^T + b) W2``, LoRA-like on the
    representation."""
    return lowrank_edit(h, *_NODIREFT((W2, W1, b, None)), act=act, index=index, backend=backend)


def consreft(h, R, b, *, index=None, backend=None):
    """ConsReFT (pyreft ``ConsreftIntervention``): ``h + (b - h R^T) R``, R orthonormal rows."""
    return lowrank_edit(h, *_CONSREFT((R, b, None)), index=index, backend=backend)


def lobireft(h, R, b, *, index=None, backend=None):
    """LoBiReFT (pyreft ``LobireftIntervention``): ``h + b R``, R orthonormal rows."""
    return lowrank_edit(h, *_LOBIREFT((R, b, None)), index=index, backend=backend)


def loreft_(h, R, W, b, *, act=None, index=None, backend=None):
    """In-place ``loreft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_LOREFT((R, W, b, None)), act=act, index=index, backend=backend)


def noreft_(h, W2, W1, b1, b2=None, *, act=None, index=None, backend=None):
    """In-place ``noreft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_NOREFT((W2, W1, b1, b2, None)), act=act, index=index, backend=backend)


def direft_(h, R, W, b, *, act=None, index=None, backend=None):
    """In-place ``direft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_DIREFT((R, W, b, None)), act=act, index=index, backend=backend)


def nodireft_(h, W2, W1, b, *, act=None, index=None, backend=None):
    """In-place ``nodireft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_NODIREFT((W2, W1, b, None)), act=act, index=index, backend=backend)


def consreft_(h, R, b, *, index=None, backend=None):
    """In-place ``consreft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_CONSREFT((R, b, None)), index=index, backend=backend)


def lobireft_(h, R, b, *, index=None, backend=None):
    """In-place ``lobireft``: edits the listed rows of ``h`` and returns ``h``."""
    return lowrank_edit_(h, *_LOBIREFT((R, b, None)), index=index, backend=backend)
