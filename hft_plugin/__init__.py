"""hft-plugin: Half Fine-Tuning for the trainers people already use.

Half Fine-Tuning (Hui et al., ACL 2025) trains a chosen half of an LLM's parameters in each
fine-tuning round and freezes the rest, choosing a new half each round. The paper reports less
forgetting than full fine-tuning; what this project measured is in docs/forgetting.md and
docs/performance.md.

    >>> from hft_plugin import select_half, apply_selection, HFTConfig, HFTError

Nothing heavy is imported until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "HFTConfig": "config",
    "HFTError": "errors",
    "ConfigError": "errors",
    "LayoutError": "errors",
    "UnsupportedModelError": "errors",
    "SelectionMismatchError": "errors",
    "ManifestError": "errors",
    "NothingToTrainError": "errors",
    "ReferenceModelError": "errors",
    "IntegrationError": "errors",
    "OptimizerMismatchError": "errors",
    "ReplayError": "errors",
    "ReplayUnsupportedError": "errors",
    "CalibrationError": "errors",
    "ScoresError": "errors",
    "Selection": "selection",
    "select_half": "selection",
    "apply_selection": "freeze",
    "HFTHandle": "freeze",
    "enable_hft": "adapters.transformers",
    "disable_hft": "adapters.transformers",
    "watch_forgetting": "adapters.watch",
    "ProbeTextsError": "errors",
    "VocabularyMismatchError": "errors",
    "enable_replay": "adapters.trainer_replay",
    "disable_replay": "adapters.trainer_replay",
    "half_reset": "reset",
    "half_reset_checkpoint": "reset",
    "dequantize_for_training": "quantized",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import HFTConfig
    from .errors import (CalibrationError, ConfigError, HFTError, IntegrationError, LayoutError, ManifestError,
                         NothingToTrainError, OptimizerMismatchError, ProbeTextsError, ReferenceModelError, ReplayError,
                         ReplayUnsupportedError, ScoresError, SelectionMismatchError, UnsupportedModelError,
                         VocabularyMismatchError)
    from .adapters.trainer_replay import disable_replay, enable_replay
    from .adapters.watch import watch_forgetting
    from .freeze import HFTHandle, apply_selection
    from .quantized import dequantize_for_training
    from .selection import Selection, select_half


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hft_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
