"""Launched by tests/test_distributed.py under torchrun: trains tiny models through the HF Trainer
with HFT on every rank and writes what each rank saw to OUT/rank<N>.json.

    torchrun --nproc_per_node 2 tests/_workers/train_distributed.py ddp OUT
    torchrun --nproc_per_node 2 tests/_workers/train_distributed.py deepspeed OUT
    torchrun --nproc_per_node 2 tests/_workers/train_distributed.py fsdp2 OUT

One launch runs many cases, because each launch costs start-up time: ``ddp`` runs the rank
disagreement check, then Llama, Phi-3 (fused tensors: region parameters) and Mixtral (stacked
experts: region parameters) under DDP; ``deepspeed`` runs ZeRO-2 and
ZeRO-3, each with the trainer's optimizer (create_optimizer) and with a DeepSpeed config
"optimizer" block (DummyOptim), on Llama and Phi-3, the refusal of weight decay on masked
tensors, and a ZeRO-3 checkpoint resumed (same options) and refused (another round). A failing
case is recorded and the next one runs; HFT_WORKER_ONLY=<part of a case name> runs just that.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _workers.common import check_training, collate, lm_dataset, snapshot, train_args  # noqa: E402


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()[:16]


def all_digests(value: str) -> list:
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def run_case(results: list, name: str, fn) -> None:
    only = os.environ.get("HFT_WORKER_ONLY")  # for debugging one case: a substring of its name
    if only and only not in name:
        return
    try:
        results.append({"case": name, "ok": True, **fn()})
    except Exception as exc:  # recorded for the test to report
        results.append({"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-3000:]})
    gc.collect()


def train_case(family: str, out: str, **arg_overrides) -> dict:
    from transformers import Trainer

    from hft_plugin import enable_hft
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    args = train_args(out, per_device_train_batch_size=2, **arg_overrides)  # before the model: ZeRO-3 builds it partitioned
    model = tiny_model(family)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    counts = check_training(handle.selection, before, after, trainer, handle)
    counts["trainable_numel_expected"] = handle.selection.stats()["trainable_params"]
    counts["rank_digests"] = all_digests(digest(after))
    counts["manifest"] = os.path.isfile(os.path.join(out, "hft_selection.json"))
    counts["wrapper"] = type(trainer.model_wrapped).__name__
    counts["world_size"] = trainer.args.world_size
    counts["mechanisms"] = sorted(set(handle.mechanisms().values()))
    return counts


def ddp(out: str, results: list) -> None:
    from transformers import Trainer

    from hft_plugin import SelectionMismatchError, enable_hft
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    def mismatch():
        tokenizer = tiny_tokenizer()
        model = tiny_model("llama")
        trainer = Trainer(model=model, args=train_args(f"{out}/mismatch", ddp_backend="gloo"),
                          train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
        enable_hft(trainer, seed=int(os.environ["RANK"]))  # each rank draws another half
        before = snapshot(model)
        try:
            trainer.train()
        except SelectionMismatchError as exc:
            unchanged = all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
            return {"raised": "SelectionMismatchError", "message": str(exc), "weights_unchanged": unchanged}
        return {"raised": None}

    run_case(results, "ddp-rank-mismatch", mismatch)
    for family in ("llama", "phi3", "mixtral"):  # whole tensors; fused rows; stacked experts
        run_case(results, f"ddp-{family}", lambda: train_case(family, f"{out}/ddp-{family}", ddp_backend="gloo"))


def deepspeed(out: str, results: list) -> None:
    from accelerate.state import AcceleratorState, PartialState

    from hft_plugin import IntegrationError

    PartialState(backend="gloo")  # with CPU ranks accelerate would otherwise see one process
    use_state = {"use_configured_state": True}

    def config(stage: int, ds_optimizer: bool) -> dict:
        cfg = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        }
        if ds_optimizer:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                            "eps": "auto", "torch_adam": True}}
        return cfg

    def reset():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=False)
        gc.collect()

    for stage in (2, 3):
        for ds_optimizer in (False, True):
            path = "ds-optimizer" if ds_optimizer else "create-optimizer"
            for family in ("llama", "phi3"):
                # Masked (fused) tensors under ZeRO need weight_decay=0: refused otherwise (checked below).
                decay = 0.1 if family == "llama" else 0.0
                run_case(results, f"zero{stage}-{path}-{family}", lambda: train_case(
                    family, f"{out}/z{stage}-{path}-{family}", deepspeed=config(stage, ds_optimizer),
                    accelerator_config=use_state, weight_decay=decay))
                reset()

    def refuse_decay():
        try:
            train_case("phi3", f"{out}/refuse", deepspeed=config(2, True), accelerator_config=use_state,
                       weight_decay=0.1)
        except IntegrationError as exc:
            return {"raised": "IntegrationError", "message": str(exc)}
        return {"raised": None}

    run_case(results, "zero2-phi3-weight-decay-refused", refuse_decay)
    reset()

    def resume():
        # ZeRO-3 checkpoint with HFT; resumed with the same options, and refused for another round.
        from transformers import Trainer

        from hft_plugin import SelectionMismatchError, enable_hft
        from hft_plugin.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        found = {}
        for phase, (round, steps) in enumerate(((0, 2), (0, 3), (1, 3))):
            args = train_args(f"{out}/resume", per_device_train_batch_size=2, deepspeed=config(3, False),
                              accelerator_config=use_state, max_steps=steps, save_strategy="steps", save_steps=2)
            model = tiny_model("llama")
            trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
            handle = enable_hft(trainer, round=round)
            if phase == 0:
                trainer.train()
                found["manifest_in_checkpoint"] = os.path.isfile(f"{out}/resume/checkpoint-2/hft_selection.json")
            elif phase == 1:
                before = snapshot(model)  # the fresh model; the checkpoint's weights are loaded in train()
                trainer.train(resume_from_checkpoint=f"{out}/resume/checkpoint-2")
                after = snapshot(model)
                found["resumed_step"] = trainer.state.global_step
                plan = handle.selection.plan()
                found["frozen_equal_to_fresh_model"] = all(torch.equal(before[n], after[n]) for n in plan.frozen)
            else:
                try:
                    trainer.train(resume_from_checkpoint=f"{out}/resume/checkpoint-2")
                    found["other_round"] = None
                except SelectionMismatchError as exc:
                    found["other_round"] = str(exc)
            del trainer
            reset()
        return found

    run_case(results, "zero3-resume", resume)


def fsdp2(out: str, results: list) -> None:
    """A plain loop with FSDP2's fully_shard per layer (gloo, CPU): whole tensors frozen before
    sharding train exactly; region parameters (the default for fused tensors) that fully_shard
    sharded are refused, at attach and at the forward, saying to use partial="mask"; applied to an
    already sharded model, fused tensors get the mask. (tests/test_fsdp.py covers the mask on
    shards in depth.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hft_plugin import HFTError, apply_selection, select_half
    from hft_plugin.testing import assert_frozen_and_trained, tiny_model

    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def full(model) -> dict:
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}

    def steps(model, optimizer, n=2):
        gen = torch.Generator().manual_seed(0)
        for _ in range(n):
            ids = torch.randint(3, 96, (2, 16), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def whole_tensors():
        model = tiny_model("llama")
        selection = select_half(model)
        handle = apply_selection(model, selection)
        before = full(model)
        shard(model)
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
        handle.attach(optimizer)
        steps(model, optimizer)
        counts = assert_frozen_and_trained(selection, before, full(model))
        return {"frozen": counts["frozen"], "trained": counts["trained"],
                "optimizer_owns_dtensors": all(isinstance(p, DTensor) for p in handle.parameters())}

    def fused_applied_before_sharding():
        found = {}
        for where in ("attach", "forward"):
            model = tiny_model("phi3")
            selection = select_half(model)
            handle = apply_selection(model, selection)
            before = full(model)
            shard(model)
            try:
                if where == "attach":
                    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
                    handle.attach(optimizer)
                else:  # an optimizer over the model's trainable parameters, never attached
                    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
                steps(model, optimizer)
                found[where] = None
                try:
                    assert_frozen_and_trained(selection, before, full(model))
                    found[where + "_frozen_kept"] = True
                except AssertionError as exc:
                    found[where + "_frozen_kept"] = str(exc)
            except HFTError as exc:
                found[where] = f"{type(exc).__name__}: {exc}"
                found[where + "_unchanged"] = all(torch.equal(before[n], v) for n, v in full(model).items() if n in before)
        return found

    def fused_applied_after_sharding():
        model = tiny_model("phi3")
        selection = select_half(model)
        before = full(model)
        shard(model)
        handle = apply_selection(model, selection)
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
        handle.attach(optimizer)
        steps(model, optimizer)
        counts = assert_frozen_and_trained(selection, before, full(model))
        return {"mechanisms": sorted(set(handle.mechanisms().values())), "partial": counts["partial"]}

    run_case(results, "fsdp2-llama", whole_tensors)
    run_case(results, "fsdp2-phi3-before", fused_applied_before_sharding)
    run_case(results, "fsdp2-phi3-after", fused_applied_after_sharding)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    results: list = []
    {"ddp": ddp, "deepspeed": deepspeed, "fsdp2": fsdp2}[mode](out, results)
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
