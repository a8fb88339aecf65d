"""A callback that records, while a third-party CLI trains, whether the model has its
:class:`~hft_plugin.run.HFTRun`: the proof that a framework's training path goes through the run.

Each main-process training step appends a record to ``output_dir/hft_run_probe.json``. How it gets
into the framework's trainer:

* Axolotl: ``plugins: [tests._workers.run_probe.RunProbePlugin]`` in the YAML (the repository root
  on ``PYTHONPATH``); the plugin adds the callback once the trainer exists.
* ms-swift: ``--external_plugins tests/_workers/run_probe.py --callbacks hft_run_probe``; importing
  this file registers the callback in ms-swift's ``callbacks_map``.
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

PROBE_FILE = "hft_run_probe.json"
NAME = "hft_run_probe"


class RunProbe(TrainerCallback):
    """Records the run of the trainer's model at each step. ``(args, trainer)``: ms-swift builds its
    callbacks so; Axolotl's plugin passes the trainer."""

    def __init__(self, args=None, trainer=None):
        self.trainer = trainer
        self.records: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from hft_plugin.freeze import active_handle
        from hft_plugin.layouts.base import unwrap_model
        from hft_plugin.run import HFTRun

        policy = unwrap_model(self.trainer.model if self.trainer is not None else model)
        run = HFTRun.of(policy)
        self.records.append({
            "step": state.global_step, "model": type(policy).__name__, "trainer": type(self.trainer).__name__,
            "run": run is not None,
            "claimed": bool(run and run.claimed),
            "round": run.selection.config.round if run is not None else None,
            "handle_active": run is not None and active_handle(policy) is run.handle,
        })
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, PROBE_FILE), "w") as f:
                json.dump(self.records, f)


def read(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, PROBE_FILE)) as f:
        return json.load(f)


try:  # Axolotl's plugin: the callback once the trainer exists
    from axolotl.integrations.base import BasePlugin
except ImportError:
    pass
else:
    class RunProbePlugin(BasePlugin):
        def add_callbacks_post_trainer(self, cfg, trainer):
            return [RunProbe(trainer=trainer)]

try:  # ms-swift: --callbacks hft_run_probe
    from swift.callbacks import callbacks_map
except ImportError:
    pass
else:
    callbacks_map[NAME] = RunProbe
