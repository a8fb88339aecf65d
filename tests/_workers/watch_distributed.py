"""Launched by tests/test_forgetting_monitor.py under torchrun (2 CPU ranks, DDP over gloo): the
forgetting monitor measures on the main process only, every process logs at the same steps, and a
budget stops every process at the same step. Writes what each rank saw to OUT/rank<N>.json.

    torchrun --nproc_per_node 2 tests/_workers/watch_distributed.py ddp OUT
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _workers.common import collate, lm_dataset, train_args  # noqa: E402


def case(out: str, name: str, **watch) -> dict:
    from transformers import Trainer

    from hft_plugin import enable_hft, watch_forgetting
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=tiny_model("llama"), args=train_args(os.path.join(out, name), max_steps=4),
                      train_dataset=lm_dataset(tokenizer, 32), data_collator=collate(tokenizer),
                      processing_class=tokenizer)
    enable_hft(trainer)
    monitor = watch_forgetting(trainer, samples=4, length=16, **watch)
    trainer.train()
    state = trainer.model.state_dict()
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()[:16]
    return {"case": name, "global_step": trainer.state.global_step, "history": [h["step"] for h in monitor.history],
            "logged": sorted(h["step"] for h in trainer.state.log_history if "forgetting/kl" in h),
            "stopped_at": monitor.stopped_at, "digest": digest, "world_size": trainer.args.world_size}


def main() -> None:
    out = sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    results = [case(out, "every2", every=2), case(out, "budget", every=1, max_kl=1e-9)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
