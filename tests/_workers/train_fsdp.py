"""Launched by tests/test_fsdp.py under torchrun: half fine-tunes tiny models under FSDP2 on CPU
ranks (gloo) and writes what each rank saw to OUT/rank<N>.json.

    torchrun --nproc_per_node 2 tests/_workers/train_fsdp.py plain OUT
    torchrun --nproc_per_node 2 tests/_workers/train_fsdp.py trainer OUT

``plain``: ``fully_shard`` on every decoder layer and on the model, in a plain loop, with the
selection applied before and after sharding, on Llama (whole tensors) and Phi-3 (fused
``qkv_proj``/``gate_up_proj`` trained in part): AdamW with weight decay and clipping, AdamW
without weight decay (masks alone), a custom shard placement (dim 1), the layer strategy (FSDP units with nothing to train), and
``handle.remove()``.
``trainer``: the HF Trainer with ``fsdp_config`` version 2 (accelerate's FSDP2 path, reached on
CPU through :mod:`hft_plugin.testing_fsdp`) on Llama and Phi-3 (and Phi-3 in bf16 mixed precision, with cpu_ram_efficient_loading, with
activation checkpointing), ranks that disagree, a resumed
checkpoint, and FSDP1 refusals. Every rank gathers the full tensors and checks them; a failing
case is recorded and the next one runs; HFT_WORKER_ONLY=<part of a case name> runs just that.
"""

from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _workers.common import collate, lm_dataset, train_args  # noqa: E402
from _workers.train_distributed import all_digests, digest, run_case  # noqa: E402

DECODER_LAYERS = {"llama": "LlamaDecoderLayer", "phi3": "Phi3DecoderLayer"}


def full_snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter in full (FSDP2's DTensor shards gathered), as fp32 copies, by its name in the
    unwrapped model (activation checkpointing inserts ``_checkpoint_wrapped_module.``)."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name.replace("_checkpoint_wrapped_module.", "")] = tensor.detach().clone().float()
    return out


def ownership(optimizer, handle, model) -> dict:
    """The optimizer owns exactly the handle's parameters, which are the model's current trainable ones."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in handle.parameters()}
    current = {id(p) for p in model.parameters() if p.requires_grad}
    assert expected == current, f"the handle gives {len(expected)} tensors, the model trains {len(current)} (stale handle)"
    assert owned == expected, f"optimizer owns {len(owned)} tensors, the trainable half is {len(expected)}"
    return {"optimizer_tensors": len(owned), "trainable_tensors": len(expected),
            "dtensor_params": sum(type(p).__name__ == "DTensor" for p in model.parameters())}


def batches(steps: int, rank: int):
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, as under data parallelism
    for _ in range(steps):
        ids = torch.randint(3, 96, (2, 12), generator=gen)
        yield ids


# -- the plain loop ---------------------------------------------------------------------------------------
def plain_case(family: str, when: str, weight_decay: float = 0.1, dim: int = 0, remove: bool = False,
               from_model: bool = False, **options) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from hft_plugin import apply_selection, select_half
    from hft_plugin.testing import assert_frozen_and_trained, tiny_model

    model = tiny_model(family)
    before = full_snapshot(model)
    selection = select_half(model, round=0, **options)  # computed before wrapping
    kwargs = {"shard_placement_fn": (lambda p: Shard(dim) if p.dim() > dim else None)} if dim else {}

    def shard():
        for layer in model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)

    if when == "before":
        handle = apply_selection(model, selection, partial="mask")  # the FSDP2 recipe: masks, not region parameters
        shard()
    else:
        shard()
        handle = apply_selection(model, selection)
    # the recipe: the handle's parameters; or, as many loops do, the model's trainable ones
    params = [p for p in model.parameters() if p.requires_grad] if from_model else handle.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    handle.attach(optimizer)
    for ids in batches(3, torch.distributed.get_rank()):
        model(input_ids=ids, labels=ids).loss.backward()
        handle.mask_gradients()  # before clipping, so the norm is the trained half's
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = full_snapshot(model)
    counts = assert_frozen_and_trained(selection, before, after)
    counts.update(ownership(optimizer, handle, model))
    counts["restore"] = handle.restore is not None
    counts["rank_digests"] = all_digests(digest(after))
    if remove:
        handle.remove()
        counts["flags_restored"] = all(p.requires_grad for p in model.parameters())
    return counts


def plain(out: str, results: list) -> None:
    for family in ("llama", "phi3"):
        for when in ("before", "after"):
            run_case(results, f"plain-{family}-{when}", lambda: plain_case(family, when))
    run_case(results, "plain-phi3-before-model-params", lambda: plain_case("phi3", "before", from_model=True))
    run_case(results, "plain-phi3-no-decay", lambda: plain_case("phi3", "before", weight_decay=0.0))
    run_case(results, "plain-phi3-shard-dim1", lambda: plain_case("phi3", "before", dim=1))
    # whole decoder layers frozen (FSDP units with nothing to train), embeddings frozen too
    run_case(results, "plain-phi3-layer-strategy", lambda: plain_case("phi3", "before", strategy="layer",
                                                                      train_embeddings=False))
    run_case(results, "plain-phi3-remove", lambda: plain_case("phi3", "before", remove=True))


# -- the HF Trainer ---------------------------------------------------------------------------------------
def fsdp_args(out: str, family: str, version: int = 2, **overrides):
    config = {"version": version, "transformer_layer_cls_to_wrap": [DECODER_LAYERS[family]]}
    if version == 1:
        config["sync_module_states"] = "false"  # accelerate needs a GPU to sync module states
    config.update(overrides.pop("fsdp_config", {}))
    return train_args(out, per_device_train_batch_size=2, fsdp=True, fsdp_config=config, **overrides)


class SaveRecorder:
    """Counts this rank's writes of hft_selection.json."""

    def __init__(self):
        from hft_plugin.selection import Selection

        self.calls = 0
        self._original = Selection.save
        recorder = self

        def save(selection, *args, **kwargs):
            recorder.calls += 1
            return recorder._original(selection, *args, **kwargs)

        Selection.save = save

    def close(self):
        from hft_plugin.selection import Selection

        Selection.save = self._original


def trainer_case(family: str, out: str, dtype=torch.float32, **overrides) -> dict:
    from transformers import Trainer

    from hft_plugin import enable_hft
    from hft_plugin.optimizers import unwrap as _unwrap_optimizer
    from hft_plugin.testing import assert_frozen_and_trained, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(family).to(dtype)
    trainer = Trainer(model=model, args=fsdp_args(out, family, **overrides), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer))
    handle = enable_hft(trainer)
    before = full_snapshot(model)
    recorder = SaveRecorder()
    try:
        trainer.train()
    finally:
        recorder.close()
    after = full_snapshot(trainer.model)
    counts = assert_frozen_and_trained(handle.selection, before, after)
    counts.update(ownership(_unwrap_optimizer(trainer.optimizer), handle, trainer.model))
    counts["rank_digests"] = all_digests(digest(after))
    counts["manifest"] = os.path.isfile(os.path.join(out, "hft_selection.json"))
    counts["manifest_writes"] = recorder.calls
    counts["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
    counts["checkpoint_wrapped"] = any("_checkpoint_wrapped_module" in n for n, _ in trainer.model.named_parameters())
    counts["wrapper"] = type(trainer.model_wrapped).__name__
    counts["world_size"] = trainer.args.world_size
    return counts


def refused(fn) -> dict:
    from hft_plugin import HFTError

    try:
        fn()
    except HFTError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def trainer(out: str, results: list) -> None:
    from accelerate.state import AcceleratorState

    from hft_plugin.testing_fsdp import install

    install()

    def reset():
        AcceleratorState._reset_state(reset_partial_state=False)
        gc.collect()

    for family in ("llama", "phi3"):
        run_case(results, f"trainer-{family}", lambda: trainer_case(family, f"{out}/{family}"))
        reset()
    # a bf16 model under bf16 mixed precision: accelerate upcasts the trainable tensors to fp32, the
    # frozen ones stay bf16, in the same FSDP units
    run_case(results, "trainer-phi3-bf16", lambda: trainer_case("phi3", f"{out}/bf16", dtype=torch.bfloat16, bf16=True))
    reset()
    # accelerate's FSDP2 options that put other parameter objects (or names) in place: the model moved to
    # the meta device and loaded again from rank 0; activation checkpointing wrappers around the layers
    for option in ("cpu_ram_efficient_loading", "activation_checkpointing"):
        run_case(results, f"trainer-phi3-{option}", lambda: trainer_case(
            "phi3", f"{out}/{option}", fsdp_config={option: "true"}))
        reset()

    def mismatch():
        from transformers import Trainer

        from hft_plugin import SelectionMismatchError, enable_hft
        from hft_plugin.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model("llama")
        trainer = Trainer(model=model, args=fsdp_args(f"{out}/mismatch", "llama"),
                          train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
        enable_hft(trainer, seed=int(os.environ["RANK"]))  # each rank draws another half
        before = full_snapshot(model)
        try:
            trainer.train()
        except SelectionMismatchError as exc:
            unchanged = all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
            return {"raised": "SelectionMismatchError", "message": str(exc), "weights_unchanged": unchanged,
                    "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())}
        return {"raised": None}

    run_case(results, "trainer-rank-mismatch", mismatch)
    reset()

    def resume():
        # A checkpoint saved under FSDP2; resumed with the same options, refused for another round.
        from transformers import Trainer

        from hft_plugin import SelectionMismatchError, enable_hft
        from hft_plugin.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        found = {}
        for phase, (round, steps) in enumerate(((0, 2), (0, 3), (1, 3))):
            args = fsdp_args(f"{out}/resume", "phi3", max_steps=steps, save_strategy="steps", save_steps=2)
            model = tiny_model("phi3")
            trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
            handle = enable_hft(trainer, round=round)
            if phase == 0:
                trainer.train()
                found["manifest_in_checkpoint"] = os.path.isfile(f"{out}/resume/checkpoint-2/hft_selection.json")
            elif phase == 1:
                fresh = full_snapshot(model)  # the checkpoint's weights are loaded in train()
                trainer.train(resume_from_checkpoint=f"{out}/resume/checkpoint-2")
                after = full_snapshot(trainer.model)
                found["resumed_step"] = trainer.state.global_step
                from hft_plugin.testing import assert_frozen_and_trained

                found.update(assert_frozen_and_trained(handle.selection, fresh, after))
            else:
                try:
                    trainer.train(resume_from_checkpoint=f"{out}/resume/checkpoint-2")
                    found["other_round"] = None
                except SelectionMismatchError as exc:
                    found["other_round"] = str(exc)
            del trainer
            reset()
        return found

    run_case(results, "trainer-resume-phi3", resume)
    reset()

    run_case(results, "trainer-fsdp1-flat-refused", lambda: refused(lambda: trainer_case(
        "llama", f"{out}/fsdp1", version=1, fsdp_config={"use_orig_params": "false"})))
    reset()
    run_case(results, "trainer-fsdp1-fused-refused", lambda: refused(lambda: trainer_case(
        "phi3", f"{out}/fsdp1-phi3", version=1, fsdp_config={"use_orig_params": "true"})))
    reset()


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    results: list = []
    if mode == "plain":
        torch.distributed.init_process_group("gloo")
    {"plain": plain, "trainer": trainer}[mode](out, results)
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
