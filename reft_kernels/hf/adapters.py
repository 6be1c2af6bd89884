"""Named adapters on one model, with PEFT's method names: ``model.reft.add_adapter(name, config)``,
``set_adapter(name)``, ``delete_adapter(name)``, ``active_adapter``, ``adapter_names``, and
``disabled(name)``.

An adapter is one set of interventions (one or more ``REDConfig`` / ``ReftConfig``, as
``get_reft_model`` takes). ``get_reft_model(model, config)`` attaches the first, named
``"default"`` unless ``adapter_name=`` says otherwise. One adapter is active at a time:

- the active adapter's interventions are ``model.reft_interventions`` and its hooks edit every
  forward; the others sit in ``model.reft_adapters`` (a ModuleDict by name, present only while
  there are inactive adapters), so ``model.to()``, ``.half()`` and ``copy.deepcopy`` carry them,
  but no hook reads them;
- an inactive adapter's parameters are frozen (``requires_grad=False``, so an optimizer built
  from the trainable parameters and the Trainer see only the active one) and get back their own
  ``requires_grad`` when it is activated; build the optimizer after ``set_adapter``;
- switching moves modules and hooks, nothing else: no weights are copied or rebuilt, and the
  model's own state is untouched;
- ``modules_to_save`` belong to the model and are shared by all its adapters (PEFT keeps a copy
  per adapter; here one set trains with whichever adapter is active);
- ``model.save_pretrained`` and the Trainer's checkpoints write the active adapter;
  ``save_interventions(model, dir, adapter_name=...)`` writes any one by name and
  ``load_interventions(model, dir, adapter_name=...)`` reads one into a named adapter (added,
  inactive, when the name is new: PEFT's ``load_adapter``).

A switch inside a forward, or with RED merged into the weights (``merge_red``), raises.
"""
from __future__ import annotations

import re

from torch import nn

from .config import as_configs

DEFAULT_ADAPTER = "default"
ADAPTERS_ATTR = "reft_adapters"  # the inactive adapters' modules: ModuleDict {name: ModuleList}
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name) -> str:
    """``name`` as an adapter name: a non-empty str of letters, digits, ``_`` and ``-`` (it keys
    a ModuleDict and a saved folder); TypeError / ValueError naming it otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"adapter_name must be letters, digits, '_' or '-' (it keys a module), got {name!r}")
    return name


class AdapterMethods:
    """The named-adapter methods of ``ReftHandle`` (``model.reft``)."""

    @property
    def adapter_names(self) -> tuple:
        """Every adapter's name, the active one first, then the others in the order added."""
        return (self.active_adapter,) + tuple(self._inactive)

    def add_adapter(self, adapter_name: str, config_or_configs):
        """Build interventions for ``config_or_configs`` (as ``get_reft_model`` takes) on this
        model under ``adapter_name``, inactive (``set_adapter`` activates it); returns the model.
        Its parameters are frozen until then. ValueError for a name in use or a config the model
        cannot take (nothing changes then)."""
        self._check_attached("add_adapter()")
        check_adapter_name(adapter_name)
        if adapter_name in self.adapter_names:
            raise ValueError(f"an adapter named {adapter_name!r} exists already (adapters: {list(self.adapter_names)})")
        ad = self._build(adapter_name, as_configs(config_or_configs))
        ad.grad = [p.requires_grad for p in ad.groups.parameters()]
        for p in ad.groups.parameters():
            p.requires_grad_(False)
        self._park(ad)
        self._quiet_resume()
        return self.model

    def set_adapter(self, adapter_name: str):
        """Make ``adapter_name`` the active adapter (its interventions edit the forwards; the
        previous one's are kept, frozen, and come back with its own ``requires_grad`` when it is
        set again); returns the model. ValueError for an unknown name."""
        self._check_attached("set_adapter()")
        self._known(adapter_name, "set_adapter()")
        if adapter_name == self.active_adapter:
            return self.model
        self._check_switch("set_adapter()")
        new = self._unpark(adapter_name)
        old = self._active
        self._deactivate()
        old.grad = [p.requires_grad for p in old.groups.parameters()]
        for p in old.groups.parameters():
            p.requires_grad_(False)
        self._park(old)
        for p, g in zip(new.groups.parameters(), new.grad):
            p.requires_grad_(g)
        new.grad = None
        self._activate(new)
        self._quiet_resume()
        return self.model

    def delete_adapter(self, adapter_name: str):
        """Remove the inactive adapter ``adapter_name`` and its modules; returns the model. The
        active adapter cannot be deleted (``set_adapter`` another first, or ``remove()``
        everything): ValueError, as for an unknown name."""
        self._check_attached("delete_adapter()")
        self._known(adapter_name, "delete_adapter()")
        if adapter_name == self.active_adapter:
            raise ValueError(f"{adapter_name!r} is the active adapter: set_adapter() another one first, or "
                             "model.reft.remove() to detach every adapter")
        self._check_switch("delete_adapter()")
        self._unpark(adapter_name)
        self._quiet_resume()
        return self.model

    # ------------------------------------------------------------------ helpers
    def _known(self, adapter_name, what: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name not in self.adapter_names:
            raise ValueError(f"{what}: no adapter named {adapter_name!r}; this model has {list(self.adapter_names)}")

    def _check_switch(self, what: str) -> None:
        if self._in_forward:
            raise RuntimeError(f"{what} inside the model's forward")

    def _adapter(self, adapter_name=None):
        """The ``_Adapter`` record of ``adapter_name`` (None: the active one)."""
        if adapter_name is None or adapter_name == self.active_adapter:
            return self._active
        self._known(adapter_name, "adapter_name")
        return self._inactive[adapter_name]

    def _park(self, ad) -> None:
        """Keep ``ad``'s modules in ``model.reft_adapters`` as an inactive adapter."""
        model = self.model
        store = getattr(model, ADAPTERS_ATTR, None)
        if store is None:
            store = nn.ModuleDict()
            model.add_module(ADAPTERS_ATTR, store)
        store[ad.name] = ad.groups
        self._inactive[ad.name] = ad

    def _unpark(self, adapter_name: str):
        """Take the inactive adapter ``adapter_name`` out of ``model.reft_adapters`` (the store
        goes when it is empty, so a model with one adapter looks as it always did)."""
        model = self.model
        ad = self._inactive.pop(adapter_name)
        store = getattr(model, ADAPTERS_ATTR)
        del store[adapter_name]
        if not len(store):
            delattr(model, ADAPTERS_ATTR)
        return ad
