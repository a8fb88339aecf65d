"""``import hft_plugin.auto``: switch HFT on in this process and in the processes it starts.

The explicit form of the start-up hook, for a program that cannot set environment variables
before it starts (a notebook, a Ray task, a launcher that scrubs the environment)::

    import hft_plugin.auto  # before or after importing transformers / llamafactory / openrlhf
    for round, task in enumerate(tasks):
        os.environ["HFT_ROUND"] = str(round)   # read when each train() starts
        trainer = SFTTrainer(...)
        trainer.train()                        # trains this round's half

It sets ``HFT_ENABLE=1`` unless the variable is already set (an explicit ``HFT_ENABLE=0`` wins and
is reported), then arms the adapters exactly as the installed hook does. Importing it twice is
harmless.
"""

from __future__ import annotations

import os
import sys

from . import switches
from .bootstrap import env, startup

if not os.environ.get(env.HFT_ENABLE, "").strip():
    os.environ[env.HFT_ENABLE] = "1"
    startup._state["set_enable"] = "1"  # ours to take back: startup.deactivate() unsets it
if switches.read(os.environ[env.HFT_ENABLE]) is False:
    sys.stderr.write("hft_plugin: `import hft_plugin.auto` ignored because HFT_ENABLE is set to off.\n")
else:
    startup.activate()
