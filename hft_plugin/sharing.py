"""The reference model of preference training shares the policy's frozen half.

DPO, KTO, GRPO and PPO-style training keep a reference model beside the policy, usually loaded from
the same checkpoint: with full fine-tuning, a second full copy of the weights. Under HFT the
policy's frozen half stays bit-identical for the whole round, and that is exactly what the
reference holds. So every reference tensor that is bit-identical to a tensor the selection freezes
whole (same name, shape, dtype, device and bits, checked once, here) can be the policy's tensor,
and the reference's own copy is freed.

    >>> from hft_plugin import apply_selection, select_half
    >>> from hft_plugin.sharing import share_reference
    >>> from hft_plugin.testing import tiny_model
    >>> policy, reference = tiny_model("llama"), tiny_model("llama").eval()  # one seed: one checkpoint
    >>> handle = apply_selection(policy, select_half(policy, round=0))
    >>> shared = share_reference(handle, reference)
    >>> shared.report.shared_tensors == len(handle.selection.plan().frozen)
    True
    >>> handle.remove()  # the reference gets its own copy back before any flag changes
    >>> shared.active
    False

What stays true:

* The reference keeps its own ``Parameter`` objects, names, ``requires_grad`` flags and train/eval
  mode; only the storage under a shared parameter changes (``param.data``), to storage holding the
  same bits, so its outputs are bit-identical.
* Only tensors the selection's plan (``selection.plan().frozen``) freezes whole are shared, never
  one that trains whole or in part, whatever its ``requires_grad`` says: a partly trained tensor
  may be updated through views an optimizer owns.
* Before a shared tensor could move, the reference gets its own bit-identical copy back
  (:meth:`SharedReference.unshare`): when the handle is removed (``disable_hft``,
  ``handle.remove()``, a new round applied to the same model), when :meth:`SharedReference.check`
  finds that a flag was changed by hand or the selection changed (call it before each training
  starts; the trainer integration does), and, for the tensors that differ, before a checkpoint is
  loaded into the policy (:meth:`SharedReference.before_load`).
* Where sharing cannot be safe nothing is shared, and the report says why in one line: DeepSpeed
  ZeRO-3 (partitioned tensors), a reference that DeepSpeed prepared as its own engine, FSDP or
  other sharded (DTensor) parameters, or a reason the caller gives (``declined``).

Bad input raises :class:`ReferenceModelError` before anything changes: the policy itself as its own
reference, a PEFT-wrapped reference, a reference (or policy) on the meta device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError, ReferenceModelError
from .layouts.base import is_peft, unwrap_model

if TYPE_CHECKING:
    from .freeze import HFTHandle

logger = logging.getLogger("hft_plugin")

__all__ = ["share_reference", "keep_shared", "SharedReference", "SharingReport", "ReferenceModelError",
           "shared_reference", "unshareable_reason", "same_bits"]

# Why a reference tensor was not shared, each read after a count ("3 train in this round").
TRAINS = "train in this round"
TRAINS_IN_PART = "train in part (fused tensors)"
REQUIRES_GRAD = "are frozen by the selection but require grad (changed by hand)"
ALIASED = "share storage with a trained policy tensor"
ALREADY = "are already the policy's own tensors"
MISSING = "have no policy tensor of the same name"
SHAPE = "have another shape"
DTYPE = "have another dtype"
DEVICE = "are on another device"
VALUES = "have other values"
SHARDED = "are partitioned or sharded"

# Why nothing was shared, one line each.
ZERO3 = "DeepSpeed ZeRO-3 partitions the tensors, so no whole tensor exists to share"
DEEPSPEED_ENGINE = "DeepSpeed prepared the reference as its own engine, which owns its tensors"
FSDP = "FSDP shards the tensors (DTensor or flat parameters), so no whole tensor exists to share"

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# unwrapped reference -> its active sharing; weak, so a dropped reference takes its entry along
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, SharedReference]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class SharingReport:
    """How much of a reference model shares the policy's storage.

    Attributes:
        shared_tensors, shared_bytes: reference tensors now backed by the policy's frozen tensors,
            and their size in bytes (numel x element size): the reference memory freed, unless
            something else still holds the reference's old copy. Kept current: a tensor unshared
            later moves to ``not_shared`` with the reason.
        reference_tensors, reference_bytes: all the reference's parameters (tied ones once).
        not_shared: reason -> names of the reference tensors not shared for that reason.
        reason: why nothing at all was shared (one line), or None.
    """

    shared_tensors: int = 0
    shared_bytes: int = 0
    reference_tensors: int = 0
    reference_bytes: int = 0
    not_shared: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    reason: str | None = None

    def summary(self) -> str:
        """One line, e.g. ``reference model: 18 of 39 tensors share the policy's frozen half (1.6
        MiB of 2.6 MiB, 62%); not shared: 21 train in this round (e.g. lm_head.weight)``."""
        if self.reason is not None:
            return f"reference model: nothing shared: {self.reason}."
        share = self.shared_bytes / self.reference_bytes if self.reference_bytes else 0.0
        line = (f"reference model: {self.shared_tensors} of {self.reference_tensors} tensors share the policy's "
                f"frozen half ({_mib(self.shared_bytes)} of {_mib(self.reference_bytes)}, {share:.0%})")
        if self.not_shared:
            parts = [f"{len(names)} {reason} (e.g. {names[0]})" for reason, names in self.not_shared.items()]
            line += "; not shared: " + "; ".join(parts)
        return line + "."

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


@dataclasses.dataclass
class _Pair:
    name: str
    policy: nn.Parameter
    reference: nn.Parameter


class SharedReference:
    """A reference model whose tensors share the policy's frozen ones; see the module docstring.

    ``report`` says what is shared; ``active`` whether anything still is. Built by
    :func:`share_reference`.
    """

    def __init__(self, handle: "HFTHandle | None", reference: nn.Module, report: SharingReport,
                 pairs: list[_Pair] | None = None):
        self.handle = handle
        # weak: the registry of active sharings is keyed by the reference, and must not keep it alive
        self._reference = weakref.ref(unwrap_model(reference))
        self.report = report
        self._pairs = list(pairs or ())

    @property
    def reference(self) -> nn.Module | None:
        """The (unwrapped) reference model, while it exists."""
        return self._reference()

    @property
    def active(self) -> bool:
        return bool(self._pairs)

    @property
    def shared_names(self) -> list[str]:
        return [pair.name for pair in self._pairs]

    def unshare(self, why: str = "", names=None) -> list[str]:
        """Give the reference its own copy of the shared tensors (all, or ``names``), bit-identical
        to the policy's now. Idempotent; returns the names copied back. The report counts them
        under "were unshared (why)"."""
        selected = None if names is None else set(names)
        copied = []
        for pair in [p for p in self._pairs if selected is None or p.name in selected]:
            if _same_storage(pair.reference, pair.policy):
                pair.reference.data = pair.reference.data.clone()  # the same bits, the same strides
                copied.append(pair.name)
        self._drop([p.name for p in self._pairs if selected is None or p.name in selected],
                   f"were unshared ({why})" if why else "were unshared")
        if copied:
            logger.info("hft_plugin: the reference model has its own copy of %d tensors again%s.", len(copied),
                        f" ({why})" if why else "")
        return copied

    def _drop(self, names: list[str], reason: str) -> None:
        """Forget pairs (already unshared, or no longer sharing); the report follows."""
        names = set(names)
        dropped = [p for p in self._pairs if p.name in names]
        for pair in dropped:
            self._pairs.remove(pair)
            self.report.shared_tensors -= 1
            self.report.shared_bytes -= pair.reference.numel() * pair.reference.element_size()
            self.report.not_shared.setdefault(reason, []).append(pair.name)
        reference = self._reference()
        if not self._pairs and reference is not None and _ACTIVE.get(reference) is self:
            del _ACTIVE[reference]

    def check(self) -> list[str]:
        """Unshare every tensor that could start to move: its handle was removed, the handle's
        selection no longer freezes it whole, the policy's parameter of that name is another object,
        or its ``requires_grad`` was set by hand. Call it before each training starts (before an
        optimizer is built). Returns the names unshared; a warning names them."""
        if not self._pairs:
            return []
        if self.handle is None or self.handle.removed:
            return self.unshare("the HFT selection was removed")
        frozen = set(self.handle.selection.plan().frozen)
        current = dict(unwrap_model(self.handle.model).named_parameters())
        moving, gone = [], []
        for pair in self._pairs:
            if not _same_storage(pair.reference, pair.policy):
                gone.append(pair.name)  # the policy's tensor was replaced (moved, cast): nothing shared now
            elif pair.name not in frozen or current.get(pair.name) is not pair.policy or pair.policy.requires_grad:
                moving.append(pair.name)
        if gone:
            self._drop(gone, "were replaced in the policy (moved or cast); the reference kept its copy")
            logger.info("hft_plugin: %d tensors are no longer shared with the reference model (e.g. %s): the policy's "
                        "tensors were replaced, e.g. moved or cast when the trainer prepared the model; the reference "
                        "keeps its own copy.", len(gone), gone[0])
        if moving:
            logger.warning("hft_plugin: %d policy tensors shared with the reference model may train now (e.g. %s: "
                           "requires_grad set by hand, or another selection); the reference got its own copy of "
                           "them first.", len(moving), moving[0])
            self.unshare("they may train now", names=moving)
        return moving

    def before_load(self, checkpoint: str) -> list[str]:
        """Call before ``checkpoint``'s weights are loaded into the policy, which writes into the
        policy's tensors in place: every shared tensor whose value there differs (after the cast
        loading applies) is unshared first. Reads safetensors files (``model.safetensors`` or a
        sharded index) one tensor at a time; a checkpoint in any other format unshares everything.
        Returns the names unshared."""
        if not self._pairs:
            return []
        reader = _open_weights(checkpoint)
        if reader is None:
            return self.unshare(f"{checkpoint} holds no safetensors weights to compare before loading")
        differ = []
        with reader:
            for pair in self._pairs:
                if pair.name not in reader:
                    continue  # loading writes nothing into this tensor
                value = reader.get(pair.name)
                value = value.to(device=pair.policy.device, dtype=pair.policy.dtype)
                if value.shape != pair.policy.shape or not same_bits(value, pair.policy.detach()):
                    differ.append(pair.name)
        return self.unshare(f"{checkpoint} has other values for them", names=differ) if differ else []

    def __repr__(self) -> str:
        return f"SharedReference(shared_tensors={len(self._pairs)}, {self.report.summary()!r})"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bits (so 0.0 and -0.0 differ, and a
    NaN equals the same NaN), compared as integers of the element size."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_OF_SIZE.get(a.element_size())
    if view is None or a.is_complex():
        return torch.equal(a, b)
    return torch.equal(a.view(view), b.view(view))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _is_sharded(param: torch.Tensor) -> bool:
    if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return dtensor is not None and isinstance(param, dtensor.DTensor)


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def unshareable_reason(policy: nn.Module, reference: nn.Module) -> str | None:
    """Why no tensor of ``reference`` can share ``policy``'s (one line), or None: ZeRO-3 partitioned
    tensors, a reference DeepSpeed prepared as its own engine, FSDP wrappers or sharded (DTensor)
    parameters. Wrappers are looked through."""
    policy, ref_inner = unwrap_model(policy), unwrap_model(reference)
    models = (policy, ref_inner)
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for m in models for p in m.parameters()):
        return ZERO3
    if _class_names(reference) & {"DeepSpeedEngine", "PipelineEngine"}:
        return DEEPSPEED_ENGINE
    fsdp = {"FullyShardedDataParallel", "FSDPModule"}
    if any(_class_names(m) & fsdp for model in (policy, reference) for m in model.modules()):
        return FSDP
    if any(_is_sharded(p) for m in models for p in m.parameters()):
        return FSDP
    return None


def _check_input(handle: "HFTHandle", reference) -> nn.Module:
    if not isinstance(reference, nn.Module):
        raise ReferenceModelError(f"The reference model must be a torch.nn.Module, got {type(reference).__name__}.")
    policy = unwrap_model(handle.model)
    inner = unwrap_model(reference)
    if inner is policy or reference is handle.model:
        raise ReferenceModelError(
            f"The reference model is the policy itself ({type(policy).__name__} object): it would train with the "
            "policy. Load the reference separately (e.g. from the same checkpoint), or pass none."
        )
    if is_peft(inner):
        raise ReferenceModelError(
            f"The reference model is PEFT-wrapped ({type(inner).__name__}); its tensors are not the policy's "
            "under the same names. Pass the base model (merge_and_unload()), or keep the reference as it is."
        )
    for label, model in (("reference", inner), ("policy", policy)):
        meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise ReferenceModelError(
                f"The {label} model is on the meta device (e.g. {meta!r} has no data): load its weights first "
                "(from_pretrained, or to_empty() then load_state_dict)."
            )
    if handle.removed:
        raise ReferenceModelError("This HFT handle was removed; apply the selection again before sharing.")
    return inner


def share_reference(handle: "HFTHandle", reference: nn.Module, *, declined: str | None = None) -> SharedReference:
    """Let ``reference`` share the storage of every policy tensor that ``handle``'s selection freezes
    whole and that it holds bit for bit (same name, shape, dtype, device and bits).

    Args:
        handle: the selection applied to the policy (:func:`~hft_plugin.apply_selection`,
            :func:`~hft_plugin.enable_hft`). When it is removed the reference gets its copy back.
        reference: the reference model (any ``nn.Module``; DDP/DeepSpeed/``torch.compile``
            wrappers are looked through). Its parameters' names must match the policy's.
        declined: a reason the caller knows sharing cannot be safe (a trainer setting); nothing is
            shared and the report gives this reason.

    Returns:
        A :class:`SharedReference`; ``.report`` says how many tensors and bytes are shared, and
        per reason which were not. A reference shared before (with this or another policy) gets
        its own copy back first.

    Raises:
        ReferenceModelError: the reference is the policy itself, PEFT-wrapped, not a module, or a
            model is on the meta device; the handle was removed. Nothing changes.

    Cost: one pass comparing the candidate tensors' bits, at set-up only.
    """
    if declined is not None:
        _unshare_previous(reference, handle)
        return SharedReference(handle, reference, _declined_report(reference, declined))
    inner = _check_input(handle, reference)
    previous = _ACTIVE.get(inner)
    if previous is not None and previous.handle is handle and not previous.check() and previous.active:
        return previous  # already shared with this selection
    _unshare_previous(inner, handle)
    policy = unwrap_model(handle.model)
    report = _declined_report(inner, None)
    report.reason = unshareable_reason(policy, reference)
    if report.reason is not None:
        return SharedReference(handle, reference, report)
    pairs = _match(handle, policy, list(inner.named_parameters()), report)
    for pair in pairs:
        pair.reference.data = pair.policy.data  # the reference's own copy is freed here
    report.shared_tensors = len(pairs)
    report.shared_bytes = sum(p.reference.numel() * p.reference.element_size() for p in pairs)
    shared = SharedReference(handle, reference, report, pairs)
    if pairs:
        _ACTIVE[inner] = shared
        weak = weakref.ref(shared)
        handle.on_remove(lambda: _unshare_if_alive(weak, "the HFT selection is being removed"))
    return shared


def keep_shared(shared: SharedReference | None, handle: "HFTHandle", reference: nn.Module, *,
                declined: str | None = None) -> SharedReference:
    """What an integration calls whenever a training run may start: share ``reference`` with
    ``handle``'s policy if it is not yet (a new selection or model since, or the first call), else
    :meth:`~SharedReference.check` the sharing there is. Bad input (:class:`ReferenceModelError`)
    becomes a warning and a report that shares nothing, so training goes on with the reference as
    it was. Logs the report's summary (INFO)."""
    if shared is not None and shared.handle is handle and declined is None:
        shared.check()
        return shared
    try:
        shared = share_reference(handle, reference, declined=declined)
    except ReferenceModelError as exc:
        logger.warning("hft_plugin: the reference model keeps its own tensors: %s", exc)
        shared = share_reference(handle, reference, declined=str(exc))
    logger.info("hft_plugin: %s", shared.report.summary())
    return shared


def _unshare_if_alive(weak: "weakref.ref[SharedReference]", why: str) -> None:
    shared = weak()
    if shared is not None:
        shared.unshare(why)


def _unshare_previous(reference, handle) -> None:
    if isinstance(reference, nn.Module):
        previous = _ACTIVE.get(unwrap_model(reference))
        if previous is not None:
            previous.unshare("shared again" if previous.handle is handle else "shared with another policy")


def _match(handle: "HFTHandle", policy: nn.Module, ref_params, report: SharingReport) -> list[_Pair]:
    plan = handle.selection.plan()
    frozen, partial = set(plan.frozen), set(plan.partial)
    policy_params = dict(policy.named_parameters())
    trained_storage = {p.untyped_storage().data_ptr() for n, p in policy_params.items() if n not in frozen}
    pairs = []

    def skip(reason: str, name: str) -> None:
        report.not_shared.setdefault(reason, []).append(name)

    for name, ref in ref_params:
        pol = policy_params.get(name)
        if pol is None:
            skip(MISSING, name)
        elif name in partial:
            skip(TRAINS_IN_PART, name)
        elif name not in frozen:
            skip(TRAINS, name)
        elif pol is ref or _same_storage(pol, ref):
            skip(ALREADY, name)
        elif pol.requires_grad:
            skip(REQUIRES_GRAD, name)
        elif _is_sharded(pol) or _is_sharded(ref):
            skip(SHARDED, name)
        elif pol.untyped_storage().data_ptr() in trained_storage:
            skip(ALIASED, name)
        elif pol.shape != ref.shape:
            skip(SHAPE, name)
        elif pol.dtype != ref.dtype:
            skip(DTYPE, name)
        elif pol.device != ref.device:
            skip(DEVICE, name)
        elif not same_bits(pol.detach(), ref.detach()):
            skip(VALUES, name)
        else:
            pairs.append(_Pair(name, pol, ref))
    return pairs


def share_option(value: bool | None, setting: bool | None = None) -> bool:
    """Whether to share: ``value`` if given (a bool), else ``setting`` (what the integration read
    from its settings: the Trainer adapter passes ``hft_plugin.bootstrap.env.share_reference()``),
    else ``HFT_SHARE_REFERENCE`` read through the core's parser (default on), for a caller with no
    settings of its own. Raises ConfigError on anything else, naming the argument or the variable."""
    if value is None:
        if setting is not None:
            return setting
        from .parsing import read_bool

        return read_bool(os.environ, "HFT_SHARE_REFERENCE", True)
    if not isinstance(value, bool):
        raise ConfigError(f"share_reference={value!r} is not True or False.")
    return value


def shared_reference(reference: nn.Module) -> SharedReference | None:
    """The active sharing of ``reference`` (wrappers looked through), if any tensor is shared."""
    return _ACTIVE.get(unwrap_model(reference))


def _open_weights(checkpoint: str):
    """``checkpoint``'s safetensors weights through the one checkpoint reader
    (:class:`hft_plugin.weights.CheckpointWeights`), or None when it holds none it can read."""
    from .weights import CheckpointWeights

    try:
        return CheckpointWeights(checkpoint)  # pickled weights are refused: compared as "unknown", so unshared
    except ConfigError:
        return None


def _declined_report(reference, reason: str | None) -> SharingReport:
    report = SharingReport(reason=reason)
    if isinstance(reference, nn.Module):
        seen = {}
        for _, p in unwrap_model(reference).named_parameters():
            seen[id(p)] = p.numel() * p.element_size()
        report.reference_tensors, report.reference_bytes = len(seen), sum(seen.values())
    return report
