"""The private parts of transformers, TRL, accelerate and torch that the Trainer adapters still use.

Public extension points come first (``TrainerCallback``, ``add_model_tags``, torch's tensor hooks);
what is here has none, and each entry says why. All of it sits in this one module, so a framework
release that moves one breaks one place. Versions are read once, from the installed distributions'
metadata (nothing is imported for it). The set-up and the loader are gated on the transformers
release that introduced them, and every entry also checks that what it uses is there (the clipping
methods are wrapped only where they exist, TRL's preparation is called only with a signature known
here), so an unknown layout fails with a message that names the installed version instead of an
AttributeError deep in training.

    >>> TRANSFORMERS is not None and TRANSFORMERS.release >= (5, 3)
    True
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any, Callable

from packaging.version import Version

from ..errors import ReplayUnsupportedError

_MISSING = object()


def _installed(distribution: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(distribution))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


TRANSFORMERS = _installed("transformers")
TRL = _installed("trl")


def _at_least(version: Version | None, *release: int) -> bool:
    return version is not None and version.release >= release  # a dev or rc build counts as its release


# -- transformers.Trainer: setting up training -----------------------------------------------------------
# transformers >= 5.3 builds every optimizer inside Trainer._prepare_for_training (create_optimizer,
# DeepSpeed's DummyOptim, ZeRO 2/3) before accelerate or DeepSpeed wrap model and optimizer. No callback
# fires there: on_train_begin comes after the wrap, when requires_grad can no longer change what
# trains (DDP, ZeRO and FSDP fix the trained set when they wrap).
PREPARE = "_prepare_for_training"
PREPARE_SINCE = (5, 3)


def prepare_problem(trainer_class: type) -> str | None:
    """Why this transformers cannot take HFT, or None."""
    if _at_least(TRANSFORMERS, *PREPARE_SINCE) and hasattr(trainer_class, PREPARE):
        return None
    return (f"transformers {TRANSFORMERS} sets up training differently from the versions hft_plugin supports (it has "
            f"no Trainer.{PREPARE}). Install transformers >= {'.'.join(map(str, PREPARE_SINCE))}.")


def prepare_resume(args: tuple, kwargs: dict) -> Any:
    """The ``resume_from_checkpoint`` argument of ``_prepare_for_training(max_steps, train_dataloader,
    resume_from_checkpoint)``."""
    return kwargs.get("resume_from_checkpoint", args[2] if len(args) > 2 else None)


# -- the gradient norm -----------------------------------------------------------------------------------
# Mask-mechanism tensors must have their frozen blocks zeroed before the Trainer takes the gradient
# norm (in _clip_grad_norm when max_grad_norm > 0, else in _get_grad_norm): the norm, and so the
# clipping of the trained half, must be what it is with that half frozen by hand. No callback fires
# between the backward and the norm (on_pre_optimizer_step comes after it). torch's public way,
# Tensor.register_post_accumulate_grad_hook, was measured against this in one process on a tiny Llama
# (benchmarks/grad_hook_mask.py; benchmarks/results/grad_hook_mask.md): exact, as cheap with one
# micro-batch per step (step 0.997x, masking alone 0.9x), but it masks after every micro-batch's
# backward, so with four the masking costs 3.1x (step 1.014x). Not adopted: it is not "no slower".
CLIPPING = ("_clip_grad_norm", "_get_grad_norm")


def clipping_wrappers(mask: Callable[[], None]) -> dict[str, Callable]:
    """Instance wrappers, ``name -> wrapper(original, *args, **kwargs)``, that call ``mask`` right
    before the Trainer takes the gradient norm, once per step."""

    def clip(original: Callable, *args, **kwargs):  # _clip_grad_norm(model)
        mask()
        return original(*args, **kwargs)

    def norm(original: Callable, model, grad_norm=None, *args, **kwargs):  # _get_grad_norm(model, grad_norm=None)
        if grad_norm is None:  # not clipped this step (max_grad_norm=0): the norm is measured here
            mask()
        return original(model, grad_norm, *args, **kwargs)

    return dict(zip(CLIPPING, (clip, norm)))


# -- the model -------------------------------------------------------------------------------------------
def input_grads_needed(model) -> bool:
    """Whether ``model`` needs its input embeddings' output to require grad: it checkpoints activations
    (reentrant checkpointing gives layer weights no gradient when nothing before them requires grad),
    its input embeddings are frozen, and nobody (the trainer for PEFT, the user) has done it yet.

    transformers has no public way to ask the last: ``enable_input_require_grads`` keeps its hooks in
    ``_require_grads_hooks`` (one ``_require_grads_hook`` in transformers 4), and a second call would
    overwrite them, leaving the first caller's hooks on the model for good."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename (is_gradient_checkpointing)
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if not checkpointing:
        return False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return False
    return not (getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))


# -- replay: the trainer's own data pipeline (hft_plugin.adapters.trainer_replay) --------------------------
# Replay mixes earlier examples into the trainer's own batches, prepared as the trainer prepares its own
# data. transformers documents get_train_dataloader for overriding, but not the pieces that build it
# (sampler, loader, batch size), and TRL keeps its dataset preparation private: re-implementing them would
# drift from the trainer's own processing (chat template, packing, completion masks, column removal).
LOADER_SINCE = (5, 0)  # Trainer._get_dataloader(dataset, description, batch_size, sampler_fn, is_training)
_LOADER_PARTS = ("_get_dataloader", "_get_train_sampler", "_train_batch_size")


def replay_problem(trainer) -> str | None:
    """Why this transformers cannot take replay, or None."""
    missing = next((name for name in _LOADER_PARTS if not hasattr(trainer, name)), None)
    if _at_least(TRANSFORMERS, *LOADER_SINCE) and missing is None:
        return None
    return (f"transformers {TRANSFORMERS} builds its loaders differently (no Trainer.{missing or _LOADER_PARTS[0]}); "
            f"replay needs transformers >= {'.'.join(map(str, LOADER_SINCE))}")


def train_batch_size(trainer) -> int:
    """The batch size per device the trainer trains with (after ``auto_find_batch_size``)."""
    return trainer._train_batch_size


def prepares_own_data(trainer) -> bool:
    """Whether the trainer prepares its datasets itself (TRL's trainers)."""
    return getattr(trainer, "_prepare_dataset", None) is not None


def prepare_dataset(trainer, dataset, *, plain_text: bool):
    """Run the trainer's own dataset preparation on ``dataset``, or return None if it has none.

    TRL 1.x keeps it in ``_prepare_dataset`` with one of two signatures (SFT: with packing and the
    formatting function; DPO, KTO, Reward: without). Text sampled by the model (``plain_text``) is
    prepared without the user's formatting function: it is plain language-modelling text."""
    prepare = getattr(trainer, "_prepare_dataset", None)
    if prepare is None:
        return None
    if getattr(trainer, "_skip_prepare_dataset", False):  # SFT's dataset_kwargs={"skip_prepare_dataset": True}
        return dataset
    names = list(inspect.signature(prepare).parameters)
    args = trainer.args
    if names[:6] == ["dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"]:
        formatting = None if plain_text else getattr(trainer, "_formatting_func", None)
        return prepare(dataset, trainer.processing_class, args, args.packing, formatting, "replay")
    if names[:4] == ["dataset", "processing_class", "args", "dataset_name"]:
        return prepare(dataset, trainer.processing_class, args, "replay")
    raise ReplayUnsupportedError(
        f"{type(trainer).__name__}._prepare_dataset{inspect.signature(prepare)} (TRL {TRL}) is not a "
        "signature hft_plugin knows, so replay data cannot be prepared as the trainer prepares its own. Give the "
        "replay source already prepared (the columns of trainer.train_dataset), or use TRL 1.x.")


def signature_columns(trainer) -> list[str] | None:
    """The columns the trainer keeps (``remove_unused_columns``), as the trainer computes them."""
    setter = getattr(trainer, "_set_signature_columns_if_needed", None)
    if setter is None:
        return None
    setter()
    columns = getattr(trainer, "_signature_columns", None)
    return list(columns) if columns is not None else None


def train_dataloader(trainer, dataset, make_sampler: Callable, wrap_collator: Callable):
    """The trainer's own training loader over ``dataset``, with the sampler ``make_sampler(inner)``
    (inner: the trainer's own sampler for its examples, seeded as accelerate seeds it) and the
    trainer's collator wrapped by ``wrap_collator`` (transformers >= 5.0, :func:`replay_problem`)."""
    inner = trainer._get_train_sampler(trainer.train_dataset)
    sampler = make_sampler(_seeded(trainer, inner))
    dataset.sampler = sampler
    # The trainer wraps whatever data_collator holds when it builds the loader (column removal around
    # it): for that moment it holds the wrapped collator, so what it adds survives to the trainer's own.
    had = trainer.__dict__.get("data_collator", _MISSING)
    trainer.data_collator = wrap_collator(trainer.data_collator)
    try:
        return trainer._get_dataloader(dataset=dataset, description="Training", batch_size=train_batch_size(trainer),
                                       sampler_fn=lambda _dataset: sampler, is_training=True)
    finally:
        if had is _MISSING:
            trainer.__dict__.pop("data_collator", None)
        else:
            trainer.data_collator = had


def _seeded(trainer, inner):
    """A plain ``RandomSampler`` draws its order from the global random state; accelerate replaces it by
    a seeded one (``use_seedable_sampler``) only when it sees it, which it no longer does inside the
    mixing sampler. So do what accelerate does: seed it with ``data_seed`` (else ``seed``) plus the
    epoch. The trainer's examples then come in the order accelerate would give them. (torch's
    ``RandomSampler`` keeps the requested ``num_samples`` as ``_num_samples``, None for the dataset's
    length when iterating; its public ``num_samples`` would fix that length now.)"""
    from torch.utils.data import RandomSampler

    if type(inner) is not RandomSampler:
        return inner  # the trainer's own sampler (length-grouped, sequential, a TRL trainer's): as it is
    import torch
    from accelerate.data_loader import SeedableRandomSampler

    seed = trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed
    return SeedableRandomSampler(data_source=inner.data_source, replacement=inner.replacement,
                                 num_samples=inner._num_samples, generator=torch.Generator(), data_seed=seed)
