"""The typed errors of hft-plugin.

Every error the plugin raises on purpose is an :class:`HFTError`, so callers can catch one class.
Errors about user input are raised before anything on the model changes.
"""

from __future__ import annotations


class HFTError(Exception):
    """Base class of every error hft-plugin raises on purpose."""


class ConfigError(HFTError, ValueError):
    """A configuration value is invalid (ratio, strategy, round, seed, an unknown key...)."""


class UnsupportedModelError(HFTError, TypeError):
    """The model cannot be half fine-tuned as it is (PEFT-wrapped, quantized, integer weights...)."""


class NothingToTrainError(UnsupportedModelError):
    """Nothing would train: the parameters HFT would train in this round are all frozen already
    (``requires_grad=False`` set before HFT was applied)."""


class LayoutError(HFTError):
    """The model's parameters could not be placed into transformer layers and roles."""


class SelectionMismatchError(HFTError):
    """A saved selection does not fit the model or run it is applied to."""


class ManifestError(SelectionMismatchError):
    """A saved selection (``hft_selection.json``) cannot be read: absent where one is needed (``hft
    verify``), not JSON, truncated, a key missing or of the wrong type, or a format this version does
    not know. The message names the file."""


class IntegrationError(HFTError):
    """HFT could not be attached to a trainer or framework."""


class OptimizerMismatchError(HFTError):
    """An optimizer does not own exactly the trainable elements of the applied selection: it owns or
    holds state for frozen ones (or another round's), lacks trainable ones, or would write outside a
    strided region."""


class ReferenceModelError(UnsupportedModelError):
    """The reference model cannot share the policy's tensors as given (it is the policy itself,
    it is PEFT-wrapped, or it is on the meta device)."""


class ProbeTextsError(ConfigError):
    """The forgetting monitor's probe texts cannot be used: an empty or unreadable texts file, an
    empty text, a text longer than the model's context, texts given without a tokenizer to encode
    them, or a probes file (``hft_probes.json``) that does not fit the model. The message names the
    file or the text and what to do."""


class VocabularyMismatchError(HFTError, ValueError):
    """Two models do not share one vocabulary (their output sizes or their tokenizers differ), so
    their next-token distributions cannot be compared token by token."""


class ReplayError(ConfigError):
    """A replay source or share that cannot be used: a ratio outside [0, 1), an empty, unreadable or
    damaged source, a source in a format the trainer cannot process, or ``"self"`` without a
    tokenizer. Raised before training starts; the message names the value and the fix."""


class ReplayUnsupportedError(IntegrationError):
    """The trainer's data pipeline cannot take replay (it generates its batches itself, as online RL
    trainers do, or it deals whole batches per rank itself)."""


class CalibrationError(HFTError, ValueError):
    """Calibration texts cannot give a stable importance score: none, empty ones, tokens the model
    does not have (another model's tokenizer), or fewer than the measured minimum. Raised by
    :func:`hft_plugin.importance.compute_scores` before the model runs."""


class ScoresError(SelectionMismatchError):
    """An importance scores file (``hft_scores.json``) cannot be used: missing, not a scores file,
    edited since it was written (its content hash), or computed for another model (fingerprint) or
    another round. The message names the file and how to compute it again."""
