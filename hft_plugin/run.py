"""One training run under Half Fine-Tuning, whatever framework drives it.

An adapter translates its framework's events into calls on an :class:`HFTRun`; the run owns what
every framework needs the same way::

    run = HFTRun(model, HFTConfig(round=1)).start()   # checks, selection, apply
    run.check_resume(checkpoint)                      # before the checkpoint's weights are loaded
    run.check_ranks_agree()                           # every rank trains the same half
    run.adopt(optimizer)                              # an optimizer the framework built under HFT
    run.attach(optimizer)                             # it owns exactly this round's half
    run.save_manifest(output_dir)                     # hft_selection.json beside the weights
    run.stop()                                        # the model as it was

The model's set-up (LLaMA-Factory's) and its trainer (the HF Trainer) are two framework events on
one model: the first starts the run and the second finds it with :meth:`HFTRun.of`, so HFT is
applied once. The core reads no environment variable and imports no framework: what a run cannot
know (is DeepSpeed on, was the optimizer given by the user) an adapter passes in.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable

from .checkpoints import check_checkpoint, load_renamed
from .config import HFTConfig
from .distributed import check_ranks_agree
from .errors import OptimizerMismatchError, SelectionMismatchError
from .freeze import HFTHandle, apply_selection
from .layouts.base import unwrap_model
from .optimizers import drop_frozen, unfuse_strided, unwrap
from .report import stats_metrics, train_start_summary
from .selection import Selection, select_half
from .sharing import SharedReference, keep_shared
from .zero import ZeroGradientMasks, check_zero_optimizer

logger = logging.getLogger("hft_plugin")

# the unwrapped model -> its run; weak so a dropped model takes its run with it (a run refers to
# its model only weakly, through the handle)
_RUNS: "weakref.WeakKeyDictionary[Any, HFTRun]" = weakref.WeakKeyDictionary()
# optimizers a framework built while HFT was on (not given by the user): HFT may drop and rebuild them
_BUILT: "weakref.WeakSet[Any]" = weakref.WeakSet()



class HFTRun:
    """Half fine-tuning of one model for one training run: its selection, its handle, and the
    checks and bookkeeping every framework's training start needs.

    ``partial`` is how partly trained tensors train: ``"auto"`` (region parameters) or ``"mask"``
    (where gradients live in flat partitions or shards: DeepSpeed ZeRO, FSDP).

    Example:
        >>> from hft_plugin import HFTConfig
        >>> from hft_plugin.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> run = HFTRun(model, HFTConfig(round=0)).start()
        >>> HFTRun.of(model) is run, run.selection.trainable_ratio
        (True, 0.5)
        >>> run.stop(); HFTRun.of(model) is None
        True
    """

    def __init__(self, model, config: HFTConfig, selection: Selection | None = None, *, partial: str = "auto",
                 share_reference: bool = True):
        self._model = weakref.ref(unwrap_model(model))
        self.requested = config  # the options asked for (round="next" unresolved)
        self.config = selection.config if selection is not None else config
        self.selection = selection
        self.partial = partial
        self.share_reference = share_reference
        self.handle: HFTHandle | None = None
        self.sharing: SharedReference | None = None
        # a trainer drives this run; False for a run a model's set-up started (LLaMA-Factory's
        # loader) that the trainer still has to take over
        self.claimed = False
        self._attached_to: Any = None
        self._agreed_digest: str | None = None
        self._zero_masks = ZeroGradientMasks()
        self._input_grads_enabled = False
        self._report_metrics = False
        self._resume_checked: tuple[str | None, Selection] | None = None  # in the training call under way

    @classmethod
    def of(cls, model) -> "HFTRun | None":
        """The run of ``model`` (wrappers looked through), if one is under way."""
        try:
            return _RUNS.get(unwrap_model(model))
        except TypeError:  # not something a weak reference can point to: no run
            return None

    @classmethod
    def take_over(cls, model, config: HFTConfig, *, partial: str = "auto", share_reference: bool = True) -> "HFTRun":
        """The run a framework's trainer drives on ``model``: the one the model's set-up started
        (LLaMA-Factory's loader applies HFT before the trainer exists) if it asked for the same
        options, so HFT is applied once; else a new one, started."""
        run = cls.of(model)
        if run is not None and not run.claimed and run.handle is not None and not run.handle.removed \
                and run.requested == config:
            run.share_reference = share_reference
            run.use_partial(partial)
            return run
        return cls(model, config, partial=partial, share_reference=share_reference).start()

    @property
    def model(self):
        return self.handle.model if self.handle is not None else self._model()

    # -- start and stop ------------------------------------------------------------------------------
    def start(self) -> "HFTRun":
        """Select the half (unless given) and apply it; the model is then found by :meth:`of`.
        Raises what :func:`select_half` and :func:`apply_selection` raise, before anything changes."""
        if self.selection is None:
            self.selection = select_half(self.model, config=self.config)  # refuses PEFT, quantized, unreadable models
            # the resolved options (round="next" is a number from here on), so a resumed checkpoint
            # is compared with the round that trains
            self.config = self.selection.config
        self.apply(self.selection)
        _RUNS[self.model] = self
        return self

    def apply(self, selection: Selection) -> HFTHandle:
        self.selection = selection
        self.handle = apply_selection(self.model, selection, partial=self.partial)
        self._attached_to = None
        return self.handle

    def use_partial(self, partial: str) -> None:
        """Train partly trained tensors by ``partial`` from now on. A run a model's set-up started
        before the framework said it shards gradients is applied again (only if it has such
        tensors: a selection of whole tensors is the same under both)."""
        if partial == self.partial:
            return
        self.partial = partial
        if self.handle is not None and self.handle.mechanisms():
            logger.warning("hft_plugin: the model's set-up applied HFT with region parameters, but the trainer shards "
                           "gradients (DeepSpeed or FSDP): applied again with the gradient mask.")
            self.apply(self.selection)

    def follow(self, model) -> None:
        """Before a training run starts: keep the selection applied to the model that trains."""
        model = unwrap_model(model)
        if self.handle is None or self.handle.model is not model:
            # a new model object (the Trainer's model_init builds one inside train()): same options
            old = self._model()
            if old is not None and _RUNS.get(old) is self:
                del _RUNS[old]
            self._model = weakref.ref(model)
            self.apply(select_half(model, config=self.config))
            self._zero_masks.remove()
            _RUNS[model] = self
        elif self.handle.removed:
            # another run applied its own round to this model object; put ours back
            self.apply(self.selection)
            _RUNS[model] = self

    def release_on_stop(self, optimizer, *, owned_by_engine: bool = False) -> bool:
        """HFT stops while the framework holds ``optimizer``: True when the framework must drop it
        (with its scheduler), because it was built under HFT and owns only this round's half, so the
        next training builds one for the whole model. One the user gave is left to them, with a
        warning (``owned_by_engine``: DeepSpeed built it from its config; nothing to say)."""
        if self.built_under_hft(optimizer):
            logger.info("hft_plugin: HFT disabled; the next train() builds a new optimizer and scheduler.")
            return True
        if optimizer is not None and not owned_by_engine:
            logger.warning("hft_plugin: HFT disabled, but the optimizer given to the Trainer owns only the half that "
                           "trained with HFT; give the Trainer a new optimizer to train the whole model.")
        return False

    def stop(self) -> None:
        """Undo everything the run put on the model: hooks, the input-gradient hook, the selection
        (a shared reference gets its own copy back first)."""
        self._zero_masks.remove()
        if self._input_grads_enabled:
            model = self.handle.model if self.handle is not None else None
            if model is not None and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
            self._input_grads_enabled = False
        if self.handle is not None:
            self.handle.remove()
        self.sharing = None
        self._attached_to = None
        model = self._model()
        if model is not None and _RUNS.get(model) is self:
            del _RUNS[model]

    # -- resuming ------------------------------------------------------------------------------------
    def check_resume(self, checkpoint: str | None, *, optimizer_exists: bool = False) -> None:
        """Refuse a checkpoint written by another model, round or HFT configuration (before its
        weights are loaded); resume with the checkpoint's half if it drew another one, unless an
        optimizer already holds this run's half."""
        if checkpoint is None:
            return
        resumed = check_checkpoint(checkpoint, self.selection)
        if resumed is self.selection:
            return
        if optimizer_exists:
            raise SelectionMismatchError(
                f"{checkpoint} trained another half than this installation selects for the same options, and "
                "this trainer's optimizer already exists. Create a new Trainer, enable HFT, and resume."
            )
        logger.warning("hft_plugin: %s trained another half than this installation selects for the same "
                       "options; resuming with the checkpoint's half.", checkpoint)
        self.apply(resumed)

    def check_resume_once(self, checkpoint: str | None, *, optimizer_exists: bool = False,
                          loading: bool = False) -> None:
        """:meth:`check_resume` once per checkpoint and selection in one training call (until
        :meth:`reset_resume_check`), so each framework event that can reach it first may call it;
        ``loading``: the weights are about to be loaded, so unshare what loading would change."""
        checked = self._resume_checked
        if checked is not None and checked[0] == checkpoint and checked[1] is self.selection:
            return
        self.check_resume(checkpoint, optimizer_exists=optimizer_exists)
        if loading:
            self.before_load(checkpoint)
        self._resume_checked = (checkpoint, self.selection)

    def reset_resume_check(self) -> None:
        """A training call starts or ends: the next one checks its checkpoint again."""
        self._resume_checked = None

    def load_checkpoint(self, checkpoint: str) -> None:
        """Load the tensors a framework's plain resume misses (experts saved one key per expert)."""
        unshare = self.sharing.unshare if self.sharing is not None and self.sharing.active else None
        load_renamed(self.model, checkpoint, before_write=unshare)

    def check_ranks_agree(self) -> None:
        """Every rank must train the same half: compare a digest once per selection."""
        self._agreed_digest = check_ranks_agree(self.selection, self._agreed_digest)

    # -- the optimizer's fit -------------------------------------------------------------------------
    def adopt(self, optimizer, who: str = "The trainer") -> None:
        """An optimizer the framework has just built under HFT: it owns the region parameters in
        place of their tensors, no frozen tensor, and no fused kernel over a strided region. Such
        an optimizer may later be dropped and rebuilt (see :meth:`settle`)."""
        _BUILT.add(unwrap(optimizer))
        self.handle.own_regions(optimizer)
        if drop_frozen(optimizer):
            logger.warning("hft_plugin: %s put frozen tensors in the optimizer; they were removed.", who)
        trainable = {id(p): n for n, p in self.handle.named_parameters()}
        strided = unfuse_strided(optimizer, trainable)
        if strided:
            logger.info("hft_plugin: %d trainable regions are strided views (e.g. %s); the optimizer groups "
                        "holding them run without fused kernels.", len(strided), strided[0])

    @staticmethod
    def built_under_hft(optimizer) -> bool:
        return optimizer is not None and unwrap(optimizer) in _BUILT

    def settle(self, optimizer, *, given: bool) -> bool:
        """The optimizer of a round owns exactly that round's trainable elements. True when
        ``optimizer`` does not fit and the framework must drop it (with its scheduler) and build
        one again; one the user ``given`` to the framework is refused, naming what is missing or
        extra.

        Raises:
            OptimizerMismatchError: a given optimizer that does not fit.
        """
        if optimizer is None:
            return False
        fit = self.handle.optimizer_fit(optimizer)
        if fit:
            return False
        if given and not self.built_under_hft(optimizer):
            raise OptimizerMismatchError(
                f"{fit.message()} The optimizer given to the Trainer (optimizers=(...)) cannot be used for HFT round "
                f"{self.selection.config.round}: pass one built from handle.parameters() of this round, or none "
                "(set trainer.optimizer = trainer.lr_scheduler = None) to let the Trainer build it."
            )
        logger.warning("hft_plugin: the trainer's optimizer did not fit HFT round %d (it %s); the Trainer builds a new "
                       "optimizer and scheduler for this round.", self.selection.config.round,
                       fit.problems() or "runs a fused kernel over strided regions")
        return True

    def release(self, optimizer) -> None:
        """``optimizer`` is being dropped: the handle stops checking and restoring around its steps."""
        if self.handle is not None and optimizer is not None:
            self.handle.detach(optimizer)
        self._attached_to = None

    def attach(self, optimizer) -> None:
        """The framework's optimizer for this run (refused if it does not fit the round)."""
        optimizer = unwrap(optimizer)
        if optimizer is None:
            return
        if self._attached_to is not optimizer:
            self.handle.attach(optimizer)
            self._attached_to = optimizer
        else:
            # Weights may have been loaded since the last run (a resumed checkpoint): restore
            # the frozen slices to what they are now, not to what they were then.
            self.handle.refresh()

    def install_zero_masks(self) -> None:
        """Under DeepSpeed ZeRO, mask-mechanism tensors are masked by gradient hooks, before ZeRO
        reduces their gradients into its flat partitions."""
        self._zero_masks.install(self.handle)

    def check_zero_optimizer(self, engine_optimizer) -> None:
        check_zero_optimizer(engine_optimizer, self.handle)

    def mask_gradients(self) -> None:
        if self.handle is not None:
            self.handle.mask_gradients()

    def require_input_grads(self) -> None:
        """Make the input embeddings' output require grad (the model's ``enable_input_require_grads``)
        until :meth:`stop`: reentrant checkpointing gives layer weights no gradient when nothing before
        them requires grad, and with frozen embeddings that is every layer. The adapter, which knows
        its framework's model, says when."""
        if not self._input_grads_enabled:
            self.handle.model.enable_input_require_grads()
            self._input_grads_enabled = True

    # -- the reference model -------------------------------------------------------------------------
    def share_with(self, reference, declined: str | None = None) -> SharedReference | None:
        """Let ``reference`` (a DPO/KTO/GRPO reference model) share the policy's frozen half, or
        keep sharing it; ``declined`` says why the framework's set-up rules it out."""
        if reference is None:
            self.sharing = None
            return None
        if not self.share_reference:
            declined = "turned off (share_reference=False or HFT_SHARE_REFERENCE=0)"
        self.sharing = keep_shared(self.sharing, self.handle, reference, declined=declined)
        return self.sharing

    def before_load(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.sharing is not None:
            self.sharing.before_load(checkpoint)  # loading writes into the policy's (shared) tensors

    def check_sharing(self) -> None:
        if self.sharing is not None:
            self.sharing.check()  # preparing may have moved or cast the policy's tensors

    # -- what the run leaves behind ------------------------------------------------------------------
    def summary(self, extra_lines: Iterable[str] = ()) -> str:
        """The train-start block: the overall share, per category, mechanisms, sharing."""
        return train_start_summary(self.selection, self.handle, self.sharing.report.summary() if self.sharing else "",
                                   *extra_lines)

    def save_manifest(self, directory: str) -> None:
        """``hft_selection.json`` in ``directory`` (the output dir, every checkpoint)."""
        self.selection.save(directory)

    def training_started(self, announce: str | None = None, manifest_dir: str | None = None,
                         extra_lines: Iterable[str] = ()) -> None:
        """Training starts now: the train-start block is logged for ``announce`` (the trainer's name;
        None on all but the main process), ``hft_selection.json`` written to ``manifest_dir`` (None:
        this process does not save), and the stats go into the first metrics logged from now on."""
        if announce is not None:
            # WARNING, the level transformers and TRL use for what a user must see at their default
            # verbosity: with logging unconfigured, Python's last-resort handler prints it to stderr.
            logger.warning("hft_plugin: %s trains with Half Fine-Tuning\n%s", announce, self.summary(extra_lines))
        if manifest_dir is not None:
            self.save_manifest(manifest_dir)
        self._report_metrics = True

    def metrics(self) -> dict:
        """The stats for the trainer's metrics (W&B, TensorBoard), once per training start."""
        if not self._report_metrics:
            return {}
        self._report_metrics = False
        return stats_metrics(self.selection)
