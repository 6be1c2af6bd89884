"""A ``transformers.TrainerCallback`` that writes the interventions beside each checkpoint."""
from __future__ import annotations

import os

from transformers import TrainerCallback

from .io import save_interventions, sharded

SUBFOLDER = "interventions"


class SaveInterventionsCallback(TrainerCallback):
    """On every Trainer save, writes ``save_interventions`` output to
    ``<output_dir>/checkpoint-<step>/interventions/`` (main process only; with FSDP2-sharded
    interventions every process gathers and the main one writes), and at the end of training to
    ``<output_dir>/interventions/``. Load one with
    ``load_interventions(model, that_folder)``.

    The Trainer's own checkpoint folders hold the same files already (the patched
    ``model.save_pretrained`` writes the adapter there, see ``checkpoint.py``), beside the
    Trainer's optimizer and state files; this callback keeps a folder with the adapter alone.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and (state.is_world_process_zero or sharded(model)):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SUBFOLDER)
            save_interventions(model, folder)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (state.is_world_process_zero or sharded(model)):
            save_interventions(model, os.path.join(args.output_dir, SUBFOLDER))
        return control
