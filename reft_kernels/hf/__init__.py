"""Hugging Face ``transformers`` integration: attach RED and the ReFT family to a model in one call.

- ``get_reft_model(model, REDConfig(...) | ReftConfig(...) | [..], modules_to_save=[..])``: in
  place; ``model.reft`` is the handle (``disabled()``, ``remove()``, ``merge_and_unload()``,
  ``print_trainable_parameters()``, named adapters: ``add_adapter`` / ``set_adapter`` /
  ``delete_adapter``); ``model.save_pretrained`` then writes the adapter only
  (so do the Trainer's checkpoints), and a ``peft.PeftModel``'s ``disable_adapter()`` /
  ``merge_and_unload()`` cover the interventions too.
- ``intervention_locations`` / ``locations_to_rows``: positions for a padded batch, on the device.
- ``ReftDataCollator``: (prompt, response) pairs -> input_ids, attention_mask, labels (prompt
  masked) and intervention_locations.
- ``save_interventions`` / ``load_interventions``: safetensors + JSON, atomic, checked; any named
  adapter by ``adapter_name``.
- ``load_pyreft``: import interventions that pyreft 0.1.0 saved (all six methods, both pyvene
  key styles).
- ``merge_red`` / ``unmerge_red``: fold RED into the edited layers' weights for inference, and
  restore them bit for bit; ``merge_and_unload``: fold it in for good and export a plain model.
- ``prompt_lengths_from_labels``: the prompt of a training batch told from its labels (what the
  forward uses without ``intervention_locations``).
- ``SaveInterventionsCallback``: a ``transformers.TrainerCallback`` that writes the interventions
  beside each Trainer checkpoint (imported on first use: it needs transformers).

transformers is optional: ``SaveInterventionsCallback`` needs it, ``hf/batch.py`` imports its
``Cache`` class when it is installed (at import, so that ``torch.compile`` traces no import), and
the rest works on any model whose module names the site table (or a config's ``pattern``) matches.
"""
from .attach import ReftHandle, get_reft_model
from .collator import ReftDataCollator
from .config import REDConfig, ReftConfig
from .io import load_interventions, save_interventions
from .merge import merge_and_unload, merge_red, unmerge_red
from .pyreft_import import load_pyreft
from .positions import intervention_locations, locations_to_rows, parse_positions, prompt_lengths_from_labels

__all__ = [
    "get_reft_model", "ReftHandle", "REDConfig", "ReftConfig", "ReftDataCollator",
    "save_interventions", "load_interventions", "SaveInterventionsCallback", "merge_red", "unmerge_red",
    "merge_and_unload", "load_pyreft",
    "intervention_locations", "locations_to_rows", "parse_positions", "prompt_lengths_from_labels",
]


def __getattr__(name):
    if name == "SaveInterventionsCallback":
        from .callback import SaveInterventionsCallback
        return SaveInterventionsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
