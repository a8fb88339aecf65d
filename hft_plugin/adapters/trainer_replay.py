"""Replay in ``transformers.Trainer`` and TRL's offline trainers: a share of every training batch from
earlier data or from the base model's own samples, with or without :func:`~hft_plugin.enable_hft`.

    from hft_plugin import enable_hft, enable_replay
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=task2)
    enable_hft(trainer, round="next")                  # optional: replay works with full fine-tuning too
    enable_replay(trainer, "task1.jsonl", ratio=0.1)   # or "self", "earlier", a datasets.Dataset
    trainer.train()

Where it hooks, and why there:

* ``get_train_dataloader`` (the method transformers documents for custom data loading) is wrapped
  on the trainer instance. The trainer's own loader is built by the trainer's own code, over a
  dataset of its examples followed by the replay pool, with a sampler that keeps the trainer's order
  for its examples and puts the replay share at the end of each batch (:mod:`hft_plugin.replay`).
  Everything else (column removal, the collator, workers, accelerate's sharding across ranks,
  skipping trained batches on resume) is the trainer's. A dataset-level mix (``interleave_datasets``)
  was not used: the trainer's sampler would shuffle it and the share would hold only on average.
* A ``TrainerCallback`` logs ``replay/loss`` beside ``loss``, copies the record into checkpoints,
  and prints the train-start block when HFT is not enabled (with HFT, the line joins HFT's block).
* Two forward hooks on the model (torch's public hooks) take the batch's replay marks out of the
  inputs and read the replay rows' loss from the forward's own outputs: no second forward.

The replay pool is processed as the trainer processes its own data: TRL trainers through their
dataset preparation (tokenization, chat template, EOS, completion-only loss where the source has
prompts, truncation, packing), the plain ``Trainer`` by tokenizing text with its tokenizer where its
data are token ids. The private access this needs sits in :mod:`hft_plugin.adapters.compat`.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from transformers import TrainerCallback

from .. import replay as core
from ..errors import HFTError, IntegrationError, ReplayError, ReplayUnsupportedError
from ..layouts.base import unwrap_model
from . import compat
from .base import InstanceWrappers

logger = logging.getLogger("hft_plugin")

_REPLAYS: "weakref.WeakKeyDictionary[Any, Replay]" = weakref.WeakKeyDictionary()
_MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids", "seq_lengths",
                  "completion_mask", "assistant_masks")


# -- the replay on one trainer -------------------------------------------------------------------------------
class Replay:
    """Replay on one trainer: the prepared pool, the share, and what the run used.

    Attributes:
        ratio: share of each batch from the pool, in [0, 1).
        seed: seed of the replay order (and of the self samples).
        pool: the prepared replay examples (a ``datasets.Dataset`` in the trainer's format).
        source: what was asked for, as a short string.
        used: the pool indices each training forward saw (one list per micro-batch, this process).
    """

    def __init__(self, trainer, pool, *, ratio: float, seed: int, source: str, tasks: list[str], self_file: str | None,
                 columns: list[str] | None):
        self._trainer = weakref.ref(trainer)
        self.pool, self.ratio, self.seed, self.source = pool, ratio, seed, source
        self.tasks, self.self_file, self.columns = tasks, self_file, columns
        self.used: list[list[int]] = []
        self.layout: core.EpochLayout | None = None
        # whether the forward outputs give a replay loss: not where examples are no single rows of
        # input_ids (DPO's pairs go through one concatenated forward)
        self.measured: bool | None = None if "input_ids" in getattr(pool, "column_names", ["input_ids"]) else False
        self._sum = self._count = None
        self._pending = None
        self._hooks: list[Any] = []
        self._wrappers = InstanceWrappers(trainer)
        self.callback = _ReplayCallback(self)

    @property
    def trainer(self):
        return self._trainer()

    def summary(self) -> str:
        """The train-start line: what is mixed in, at what share."""
        if self.ratio == 0:
            return f"Replay: off (ratio 0); source {self.source}."
        text = (f"Replay: {self.ratio:.1%} of each training batch from {self.source} ({len(self.pool):,} examples "
                f"after {type(self.trainer).__name__}'s own preparation), seed {self.seed}")
        if self.layout is not None:
            per_batch = self.layout.batch_size * self.ratio
            text += (f"; {per_batch:g} of every {self.layout.batch_size} examples per batch on average, "
                     f"{self.layout.replay_slots:,} per epoch of {self.layout.batches:,} batches")
        loss = {True: "logged as replay/loss", False: "replay/loss not measured (the forward gives no per-row loss)",
                None: "logged as replay/loss"}[self.measured]
        return f"{text}; {loss}."

    # -- installing -------------------------------------------------------------------------------------
    def start(self) -> "Replay":
        trainer = self.trainer
        self._wrappers.wrap("get_train_dataloader", self._train_dataloader)
        trainer.callback_handler.callbacks.insert(0, self.callback)  # before the reporters: they log replay/loss
        model = unwrap_model(trainer.model)
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward, with_kwargs=True)]
        _REPLAYS[trainer] = self
        return self

    def stop(self) -> None:
        trainer = self.trainer
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._wrappers.restore()
        if self.callback in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.remove(self.callback)
        if _REPLAYS.get(trainer) is self:
            del _REPLAYS[trainer]

    def _train_dataloader(self, original, *args, **kwargs):
        trainer = self.trainer
        if self.ratio == 0:
            return original(*args, **kwargs)
        mixed = core.MixedDataset(trainer.train_dataset, self.pool, self.columns)

        def make_sampler(inner):
            sampler = core.MixingSampler(inner, len(inner), len(self.pool), compat.train_batch_size(trainer),
                                         self.ratio, self.seed)
            self.layout = sampler.layout
            return sampler

        return compat.train_dataloader(trainer, mixed, make_sampler, _MarkingCollator)

    # -- the replay loss, from the forward's own outputs -------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        marks = kwargs.pop(core.REPLAY_KEY, None)
        self._pending = marks if module.training else None
        if marks is not None and module.training:
            flat = marks.reshape(-1)
            self.used.append(sorted(set(int(i) for i in flat[flat >= 0].tolist())) if marks.dim() > 1
                             else [int(i) for i in flat[flat >= 0].tolist()])
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        marks, self._pending = self._pending, None
        if marks is None:
            return None
        import torch

        with torch.no_grad():
            part = _replay_loss_part(marks, kwargs, output)
        if part is None:
            self.measured = False if self.measured is None else self.measured
            return None
        self.measured = True
        total, count = part
        self._sum = total if self._sum is None else self._sum + total
        self._count = count if self._count is None else self._count + count
        return None

    def take_loss(self) -> float | None:
        """The mean per-token loss on replay tokens since the last call, over every rank."""
        if self._sum is None:
            return None
        import torch

        values = torch.stack([self._sum.float().detach(), self._count.float().detach()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        self._sum = self._count = None
        return float(values[0] / values[1]) if values[1] > 0 else None


def _replay_loss_part(marks, kwargs, output):
    """(sum of per-token loss on replay tokens, number of those tokens) for one forward, or None if
    the outputs carry nothing to read it from. TRL's fused head gives ``log_probs`` and
    ``label_mask`` per token; otherwise the logits and ``labels`` of the forward."""
    import torch

    log_probs = getattr(output, "log_probs", None)
    label_mask = getattr(output, "label_mask", None)
    if isinstance(log_probs, torch.Tensor) and isinstance(label_mask, torch.Tensor):
        select = _token_selection(marks, label_mask.shape, log_probs.device)
        if select is None:
            return None
        mask = label_mask.bool() & select
        return -(log_probs * mask).sum(), mask.sum()
    logits = getattr(output, "logits", None)
    labels = kwargs.get("labels")
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor) or logits.dim() != 3:
        return None
    shifted = kwargs.get("shift_labels")
    if isinstance(shifted, torch.Tensor):
        targets, logits_used = shifted, logits
    else:
        targets, logits_used = labels[:, 1:], logits[:, :-1]
    if logits_used.shape[:2] != targets.shape:
        return None
    select = _token_selection(marks, labels.shape, logits.device)
    if select is None:
        return None
    select = select if isinstance(shifted, torch.Tensor) else select[:, 1:]
    mask = select & (targets != -100)
    if not bool(mask.any()):
        return logits.new_zeros(()), mask.sum()
    losses = torch.nn.functional.cross_entropy(logits_used[mask].float(), targets[mask], reduction="sum")
    return losses, mask.sum()


def _token_selection(marks, shape, device):
    """A [rows, tokens] boolean of replay positions for a batch of ``shape``, from row marks [rows]
    or token marks [1, tokens] (padding-free batches); None if they do not fit."""

    marks = marks.to(device)
    if marks.dim() == 1 and marks.shape[0] == shape[0]:
        return (marks >= 0).unsqueeze(1).expand(shape)
    if marks.dim() == 2 and tuple(marks.shape) == tuple(shape):
        return marks >= 0
    return None


class _MarkingCollator:
    """Takes the replay marks out of the examples (:class:`~hft_plugin.replay.Marked`), lets the trainer's collator build the batch, and
    puts them back as one tensor: [rows] when each example is a row, [1, tokens] when the collator
    packs the examples into one row (padding-free). Picklable, so loader workers can run it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        import torch

        marks = [f.mark if isinstance(f, core.Marked) else -1 for f in features]
        features = [f.row if isinstance(f, core.Marked) else f for f in features]
        batch = self.inner(features)
        ids = batch.get("input_ids") if hasattr(batch, "get") else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            if ids.shape[0] == len(features):
                batch[core.REPLAY_KEY] = torch.tensor(marks, dtype=torch.long)
            elif ids.shape[0] == 1:
                lengths = [len(f.get("input_ids", ())) for f in features]
                if sum(lengths) == ids.shape[1]:
                    batch[core.REPLAY_KEY] = torch.tensor(
                        [m for m, n in zip(marks, lengths) for _ in range(n)], dtype=torch.long).unsqueeze(0)
        return batch


class _ReplayCallback(TrainerCallback):
    """Logs ``replay/loss``, the train-start line without HFT, and keeps the record in checkpoints."""

    def __init__(self, replay: Replay):
        self.replay = replay

    def on_train_begin(self, args, state, control, **kwargs):
        from .transformers import hft_session

        trainer = self.replay.trainer
        if state.is_world_process_zero and hft_session(trainer) is None:
            logger.warning("hft_plugin: %s trains with replay\n%s", type(trainer).__name__, self.replay.summary())
        if args.should_save:
            _write_record(self.replay, args.output_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not isinstance(logs, dict) or "loss" not in logs:
            return
        value = self.replay.take_loss()
        if value is None:
            return
        logs["replay/loss"] = round(value, 4)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
            last["replay/loss"] = logs["replay/loss"]

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                _write_record(self.replay, folder)


def _write_record(replay: Replay, folder: str) -> None:
    record = {"format": 1, "tasks": replay.tasks, "replayed": replay.source, "ratio": replay.ratio,
              "seed": replay.seed}
    core.write_json(os.path.join(folder, core.RECORD_NAME), record)
    if replay.self_file and os.path.abspath(os.path.dirname(replay.self_file)) != os.path.abspath(folder):
        data = core.read_self_samples(replay.self_file)
        if data is not None:
            core.write_json(os.path.join(folder, core.SELF_NAME), data)


# -- building the pool -------------------------------------------------------------------------------------
def _tokenizer(trainer):
    processing = getattr(trainer, "processing_class", None)
    return getattr(processing, "tokenizer", processing)


def _model_folder(trainer) -> str | None:
    from ..selection import model_folder

    return model_folder(trainer.model)


def _self_texts(trainer, *, seed: int, samples: int, sample_length: int) -> tuple[list[str], str]:
    """The self samples: stored ones (this output_dir, else the folder the model was loaded from, so a
    later round replays the first round's base model), or drawn now and stored."""
    from ..sampling import sample_texts

    tokenizer = _tokenizer(trainer)
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise ReplayError(f"replay source 'self' needs a tokenizer to turn the model's samples into text, and "
                          f"{type(trainer).__name__} has none (processing_class=None). Pass the tokenizer as "
                          "processing_class=..., or replay stored data (a file or a datasets.Dataset).")
    wanted = {"seed": seed, "samples": samples, "max_new_tokens": sample_length}
    here = os.path.join(trainer.args.output_dir, core.SELF_NAME)
    stored = core.read_self_samples(here)
    if stored is not None and all(stored.get(k) == v for k, v in wanted.items()):
        return stored["texts"], here
    folder = _model_folder(trainer)
    earlier = core.read_self_samples(os.path.join(folder, core.SELF_NAME)) if folder else None
    if earlier is not None:
        logger.info("hft_plugin: replaying the samples stored in %s (drawn from the model that started the first "
                    "round).", folder)
        data = earlier
    else:
        if stored is not None:
            logger.warning("hft_plugin: %s was drawn with other settings (%s); drawing again with %s.", here,
                           {k: stored.get(k) for k in wanted}, wanted)
        model = unwrap_model(trainer.model)
        # once per run (then read from the file): it can take minutes on a CPU, so say so first
        logger.warning("hft_plugin: replay 'self': sampling %d texts of up to %d tokens from the model, once; they "
                       "are stored in %s.", samples, sample_length, here)
        texts = sample_texts(model, tokenizer, samples, max_new_tokens=sample_length, seed=seed)
        data = {"format": 1, **wanted, "temperature": 1.0, "model": str(getattr(model, "name_or_path", "") or
                                                                       type(model).__name__), "texts": texts}
    if trainer.args.should_save:
        core.write_json(here, data)
    return data["texts"], here


def _plain_prepare(trainer, dataset, main, max_length: int | None):
    """For a trainer without dataset preparation: token ids as its own examples have them."""
    main_columns = list(getattr(main, "column_names", None) or [])
    if "input_ids" in dataset.column_names or "input_ids" not in main_columns:
        return dataset
    if "text" not in dataset.column_names:
        raise ReplayError(f"{type(trainer).__name__} trains on token ids ({', '.join(main_columns)}) and does not "
                          f"prepare data itself; the replay source has columns {dataset.column_names}. Give the "
                          "source tokenized like trainer.train_dataset, or as text (a 'text' column or a text file).")
    tokenizer = _tokenizer(trainer)
    if tokenizer is None:
        raise ReplayError(f"the replay source is text and {type(trainer).__name__} has no tokenizer to tokenize it "
                          "with (processing_class=None); pass processing_class=tokenizer or tokenized data.")
    if max_length is None:
        head = main.select(range(min(len(main), 1000)))["input_ids"]
        max_length = max((len(ids) for ids in head), default=None)

    def tokenize(example):
        ids = tokenizer(example["text"], truncation=max_length is not None, max_length=max_length)["input_ids"]
        row = {"input_ids": ids}
        if "attention_mask" in main_columns:
            row["attention_mask"] = [1] * len(ids)
        if "labels" in main_columns:
            row["labels"] = list(ids)
        return row

    return dataset.map(tokenize, remove_columns=dataset.column_names)


def _check_format(trainer, raw, prepared_by_trainer: bool) -> None:
    """Refuse, before preparation, data a TRL trainer would misread: the usual mistake is a
    preference dataset (prompt/chosen/rejected) given to a trainer of another kind."""
    columns = set(raw.column_names)
    preference = {"chosen", "rejected"} <= columns
    wants_preference = "chosen" in " ".join(getattr(trainer.train_dataset, "column_names", None) or [])
    name = type(trainer).__name__
    if preference and not wants_preference and prepared_by_trainer:
        raise ReplayError(f"the replay source is a preference dataset (columns {sorted(columns)}), which {name} "
                          "cannot train on: it trains on text, messages or prompt/completion examples. Replay the "
                          "chosen answers: source.rename_column('chosen', 'completion').remove_columns('rejected').")
    if wants_preference and not preference and not {"input_ids", "chosen_ids", "chosen_input_ids"} & columns:
        raise ReplayError(f"{name} trains on preference pairs and the replay source has columns {sorted(columns)}; "
                          "give earlier preference data (prompt/chosen/rejected).")


def _prepare_pool(trainer, raw, *, plain_text: bool, max_length: int | None):
    _check_format(trainer, raw, compat.prepares_own_data(trainer))
    try:
        prepared = compat.prepare_dataset(trainer, raw, plain_text=plain_text)
    except HFTError:
        raise
    except Exception as exc:  # the trainer's own preparation refused it: say which source and why
        raise ReplayError(f"{type(trainer).__name__} cannot prepare the replay source (columns {raw.column_names}): "
                          f"{type(exc).__name__}: {exc}. Give it in the format of the training data.") from exc
    if prepared is None:
        prepared = _plain_prepare(trainer, raw, trainer.train_dataset, max_length)
    if len(prepared) == 0:
        raise ReplayError(f"the replay source is empty after {type(trainer).__name__}'s preparation (every example "
                          "was filtered out, e.g. truncated to no trainable token); give longer or other examples.")
    return prepared


def _columns(trainer, pool) -> list[str] | None:
    """The columns each example keeps: what the trainer keeps of its own, which the pool must have."""
    main = trainer.train_dataset
    main_columns = list(getattr(main, "column_names", None) or [])
    if trainer.args.remove_unused_columns:
        signature = compat.signature_columns(trainer)
        keep = [c for c in main_columns if signature is None or c in signature]
    else:
        keep = main_columns
    missing = [c for c in keep if c not in pool.column_names]
    if missing:
        raise ReplayError(f"after {type(trainer).__name__}'s preparation the replay examples lack the columns "
                          f"{missing} that its training examples have ({keep}); give the replay source in the "
                          "format of the training data (for an SFT trainer both with or both without prompts "
                          "works; packing needs both packed).")
    return keep or None


def enable_replay(trainer, source: Any, *, ratio: float = core.DEFAULT_RATIO, seed: int | None = None,
                  task_data: str | list[str] | None = None, samples: int = 256, sample_length: int = 64,
                  max_length: int | None = None) -> Replay:
    """Mix a share of replayed examples into every training batch of ``trainer``.

    Batch ``t`` holds ``floor((t+1)*B*ratio) - floor(t*B*ratio)`` replay examples (``B``: the batch
    size per device), so the share is ``ratio`` over any run of batches, to within one example; the
    trainer's own examples fill the rest, in the trainer's order. The order is a function of
    ``seed`` alone: a resumed run trains the same examples in the same order as an uninterrupted one,
    and each rank of a distributed job trains its own batches (no example twice). Works with and
    without :func:`~hft_plugin.enable_hft`; call it before ``trainer.train()``.

    Args:
        trainer: a ``transformers.Trainer`` or a TRL offline trainer (SFT, DPO, Reward, KTO).
        source: the replay pool:

            * a ``datasets.Dataset``, or a path to a ``.json``/``.jsonl`` file (a list of objects / one a
              line) or a text file (one example a line), or a list of such paths: earlier data in the
              training data's own format (prompt/completion, messages, text; preference pairs for DPO);
              prepared by the trainer as it prepares its own (chat template, completion-only loss,
              truncation, packing).
            * ``"self"``: ``samples`` texts of up to ``sample_length`` tokens that the model samples from its
              BOS token now, before training, with ``seed``; stored in ``output_dir/hft_replay_self.json``
              (a resume reuses them; a later round loaded from this folder replays the same ones) and
              trained with a plain language-modelling loss.
            * ``"earlier"``: the ``task_data`` files that earlier rounds recorded in the folder the model
              was loaded from (``hft_replay.json``): the paper's Replay of earlier tasks. With none recorded
              (the first task) nothing is replayed.
        ratio: share of each batch from ``source``, in [0, 1) (0: off). Default 0.1, the paper's.
        seed: seed of the replay order and of the self samples; default the trainer's ``data_seed``,
            else its ``seed``.
        task_data: path(s) of this run's training data, recorded in ``output_dir/hft_replay.json`` (after
            the earlier rounds' ones) so the next round's ``"earlier"`` replays them.
        max_length: for a plain ``Trainer`` and a text source: tokens kept per replay example (default:
            the longest of the first 1,000 training examples).

    Returns:
        The :class:`Replay`: ``.summary()``, ``.pool`` (the prepared examples), ``.used`` (pool indices
        each training forward saw).

    Raises:
        ReplayError: ``ratio`` outside [0, 1); an empty, unreadable or damaged source; a source the trainer
            cannot process (a preference dataset given to an SFT trainer); ``"self"`` without a tokenizer.
        ReplayUnsupportedError: a trainer that builds its batches itself (GRPO, RLOO, online distillation)
            or a transformers without the loader the mix needs.
        IntegrationError: not a ``transformers.Trainer``.

    Nothing on the trainer changes if an error is raised. A second call replaces the first.

    Example:
        >>> from datasets import Dataset
        >>> from transformers import TrainingArguments
        >>> from trl import SFTConfig, SFTTrainer
        >>> from hft_plugin import enable_replay
        >>> from hft_plugin.testing import tiny_model, tiny_tokenizer
        >>> data = Dataset.from_list([{"prompt": "q: ", "completion": "the cat sat."}] * 8)
        >>> trainer = SFTTrainer(model=tiny_model(), processing_class=tiny_tokenizer(), train_dataset=data,
        ...                      args=SFTConfig("/tmp/hft-replay-doc", report_to=[], max_length=32, use_cpu=True))
        >>> replay = enable_replay(trainer, Dataset.from_list([{"text": "earlier data."}] * 4), ratio=0.25)
        >>> print(replay.summary())  # doctest: +ELLIPSIS
        Replay: 25.0% of each training batch from a Dataset of 4 examples (4 examples after SFTTrainer's own ...
    """
    from .trainer_support import trainer_class

    if not isinstance(trainer, trainer_class()):
        raise IntegrationError(f"enable_replay needs a transformers.Trainer (or a TRL trainer), got "
                               f"{type(trainer).__name__}.")
    ratio = core.check_ratio(ratio)
    Trainer = trainer_class()
    for method in ("get_train_dataloader",):
        if getattr(type(trainer), method) is not getattr(Trainer, method):
            raise ReplayUnsupportedError(
                f"{type(trainer).__name__} builds its training batches itself ({method} is its own, as in online "
                "trainers that generate completions: GRPO, RLOO, distillation), so no share of them can be "
                "replayed data. Replay works with the Trainer and TRL's offline trainers (SFT, DPO, Reward, KTO).")
    problem = compat.replay_problem(trainer)
    if problem:
        raise ReplayUnsupportedError(problem)
    if trainer.train_dataset is None or not hasattr(trainer.train_dataset, "__len__"):
        raise ReplayUnsupportedError("replay needs a training dataset with a length (a map-style dataset); an "
                                     "iterable (streaming) training set has no batches to share out in advance.")
    args = trainer.args
    seed = (args.data_seed if args.data_seed is not None else args.seed) if seed is None else int(seed)
    tasks_here = [task_data] if isinstance(task_data, (str, os.PathLike)) else list(task_data or [])
    tasks_here = [os.path.abspath(os.fspath(t)) for t in tasks_here]
    for path in tasks_here:
        if not os.path.isfile(path):
            raise ReplayError(f"task_data={path!r}: no such file; record the file this round trains on, so the "
                              "next round can replay it.")
    earlier = core.earlier_tasks(_model_folder(trainer))
    self_file = None
    plain_text = False
    if isinstance(source, str) and source == core.SELF:
        texts, self_file = _self_texts(trainer, seed=seed, samples=samples, sample_length=sample_length)
        from datasets import Dataset

        field = getattr(args, "dataset_text_field", "text") or "text"
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ReplayError("the model's samples are all empty (it ends at once from BOS); raise sample_length "
                              "or replay stored data.")
        raw, plain_text, name = Dataset.from_list([{field: t} for t in texts]), True, "the model's own samples"
    elif isinstance(source, str) and source == core.EARLIER:
        if not earlier:
            folder = _model_folder(trainer)
            logger.warning("hft_plugin: replay 'earlier' found no task data recorded in %s; this round replays "
                           "nothing%s.", folder or "the model's folder (it was not loaded from one)",
                           " and records " + ", ".join(tasks_here) if tasks_here else "")
            raw, ratio, name = None, 0.0, "earlier tasks (none recorded)"
        else:
            raw, name = core.load_rows(earlier), f"earlier tasks' data ({', '.join(earlier)})"
    else:
        raw, name = core.load_rows(source), core.describe(source)
    pool = _prepare_pool(trainer, raw, plain_text=plain_text, max_length=max_length) if raw is not None else []
    columns = _columns(trainer, pool) if raw is not None else None
    previous = _REPLAYS.get(trainer)
    if previous is not None:
        previous.stop()
    replay = Replay(trainer, pool, ratio=ratio, seed=seed, source=name, tasks=earlier + tasks_here,
                    self_file=self_file, columns=columns)
    return replay.start()


def disable_replay(trainer) -> bool:
    """Undo :func:`enable_replay`: the trainer's own loader again, hooks and callback removed.
    Returns False if replay was not enabled on ``trainer``."""
    replay = _REPLAYS.get(trainer)
    if replay is None:
        return False
    replay.stop()
    return True


def replay_of(trainer) -> Replay | None:
    """The replay enabled on ``trainer``, if any."""
    return _REPLAYS.get(trainer)


def summary_lines(trainer) -> list[str]:
    """The line HFT's train-start block adds for replay (none without replay)."""
    replay = _REPLAYS.get(trainer)
    return [replay.summary()] if replay is not None else []


def auto_replay(trainer, settings: dict | None) -> None:
    """Zero-code replay (``HFT_REPLAY``): enable it on ``trainer`` once. A trainer whose data pipeline
    cannot take replay gets one log line and trains without it; bad input raises."""
    if not settings or trainer in _REPLAYS:
        return
    try:
        enable_replay(trainer, settings["source"], ratio=settings["ratio"], task_data=settings.get("task_data"))
    except ReplayUnsupportedError as exc:
        logger.warning("hft_plugin: HFT_REPLAY is set but cannot apply to %s; it trains without replay: %s",
                       type(trainer).__name__, exc)
