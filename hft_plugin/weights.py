"""Checkpoint I/O one tensor at a time: reading a folder's tensors under the names the model has in
memory, and writing safetensors files.

:class:`CheckpointWeights` reads the tensors of a folder that ``save_pretrained`` wrote
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``; pickled ``.bin``
weights only when allowed), one tensor at a time by its stored name, through
``safetensors.safe_open``: memory stays near the largest tensor. ``hft half-reset``, ``hft verify``
and the reference model's sharing read checkpoints through it, and :func:`write_safetensors`
writes ``hft half-reset``'s output the same way, tensor by tensor.

transformers 5 stores some tensors under other names and shapes than the model holds in memory:
Mixtral's and Qwen3-MoE's experts are one stacked tensor in memory
(``model.layers.0.mlp.experts.gate_up_proj``, [experts, 2 * intermediate, hidden]) but one key per
expert on disk (``...experts.0.w1.weight``, ...). :class:`ConvertedCheckpoint` groups the stored
keys by the in-memory tensor they make and builds that tensor with transformers' own conversion
mapping, the one ``from_pretrained`` applies (``transformers.conversion_mapping``), one group at a
time. So the names of a manifest (``hft_selection.json``, which records the in-memory names) can
be looked up in any checkpoint transformers itself can load.

    >>> import os, tempfile
    >>> from hft_plugin.testing import tiny_model
    >>> folder = tempfile.mkdtemp()
    >>> tiny_model("mixtral").save_pretrained(folder)
    >>> weights = CheckpointWeights(folder)
    >>> "model.layers.0.block_sparse_moe.experts.0.w1.weight" in weights   # one key per expert on disk
    True
    >>> stored = ConvertedCheckpoint(weights, meta_model(folder))
    >>> name = "model.layers.0.mlp.experts.gate_up_proj"                   # one stacked tensor in memory
    >>> len(stored.sources(name)), tuple(stored.load(stored.group(name))[name].shape)
    (8, (4, 192, 64))
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import struct
from typing import Any, Callable, Sequence

from .errors import ConfigError, HFTError, SelectionMismatchError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointWeights:
    """The tensors of a checkpoint directory, read one at a time (safetensors, or pickle if allowed).

    Args:
        directory: a folder ``save_pretrained`` wrote.
        allow_pickle: read ``pytorch_model.bin`` weights (with ``torch.load(weights_only=True)``)
            when the folder has no safetensors; refused otherwise, since a pickle can run code.
        label: how errors name the folder, e.g. ``"--base DIR"`` for a command-line flag
            (default: the directory itself).

    Raises:
        ConfigError: no such directory, no weights in it, or a file that cannot be read.

    Example:
        >>> import tempfile
        >>> from hft_plugin.testing import tiny_model
        >>> folder = tempfile.mkdtemp()
        >>> tiny_model("llama").save_pretrained(folder)
        >>> with CheckpointWeights(folder) as weights:
        ...     weights.meta("model.norm.weight")
        ((64,), 'F32')
    """

    def __init__(self, directory: str, allow_pickle: bool = False, label: str | None = None):
        self.directory = directory
        self.label = label or directory
        self.pickled = False
        self.index_name: str | None = None
        self.files: dict[str, list[str]] = {}  # file name -> its tensor names, in file order
        self._open: dict[str, Any] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # tensor -> (shape, safetensors dtype)
        self._where: dict[str, str] = {}
        if not os.path.isdir(directory):
            raise ConfigError(f"{self.label}: no such directory.")
        names = set(os.listdir(directory))
        if SAFE_INDEX in names or SAFE_WEIGHTS in names:
            self._read_layout(SAFE_INDEX, SAFE_WEIGHTS, names)
        elif PICKLE_INDEX in names or PICKLE_WEIGHTS in names:
            if not allow_pickle:
                raise ConfigError(
                    f"{self.label} holds pickled PyTorch weights (.bin), which can run code when "
                    "loaded. Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you "
                    "trust it; it is then loaded with torch.load(weights_only=True)."
                )
            self.pickled = True
            self._read_layout(PICKLE_INDEX, PICKLE_WEIGHTS, names)
        else:
            raise ConfigError(
                f"{self.label} has no {SAFE_WEIGHTS} or {SAFE_INDEX}: pass a directory saved by "
                "save_pretrained (safetensors)."
            )
        for file in list(self.files):
            self._load_names(file)

    def _read_layout(self, index_name: str, single_name: str, names: set[str]) -> None:
        if index_name in names:
            self.index_name = index_name
            path = os.path.join(self.directory, index_name)
            try:
                with open(path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{path} is not a readable weight index ({error}).") from None
            for tensor, file in weight_map.items():
                self._where[tensor] = file
                self.files.setdefault(file, [])
            for file in self.files:
                if not os.path.isfile(os.path.join(self.directory, file)):
                    raise ConfigError(f"{path} names the shard {file}, which is not in {self.directory}.")
        else:
            self.files[single_name] = []

    def _handle(self, file: str):
        handle = self._open.get(file)
        if handle is None:
            path = os.path.join(self.directory, file)
            if self.pickled:
                import torch

                try:
                    # mmap: tensors are read from disk when used, not all at once
                    handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as error:
                    raise ConfigError(f"{path} could not be loaded with weights_only=True ({first_line(error)}).") from None
            else:
                from safetensors import safe_open

                try:
                    handle = safe_open(path, framework="pt")
                except Exception as error:
                    raise ConfigError(f"{path} is not a readable safetensors file ({first_line(error)}).") from None
            self._open[file] = handle
        return handle

    def _load_names(self, file: str) -> list[str]:
        handle = self._handle(file)
        names = list(handle.keys())
        for name in names:
            if self.pickled:
                tensor = handle[name]
                self._meta[name] = (tuple(tensor.shape), dtype_code(tensor.dtype, name))
            else:
                piece = handle.get_slice(name)
                self._meta[name] = (tuple(piece.get_shape()), piece.get_dtype())
            self._where.setdefault(name, file)
        self.files[file] = names
        return names

    def names(self) -> list[str]:
        return [n for names in self.files.values() for n in names]

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, safetensors dtype code)`` of a stored tensor, read from the file header only."""
        return self._meta[name]

    def get(self, name: str):
        """The stored tensor ``name``, read from disk now (a new tensor; nothing is cached)."""
        handle = self._handle(self._where[name])
        return handle[name] if self.pickled else handle.get_tensor(name)

    def metadata(self, file: str) -> dict[str, str] | None:
        """The ``__metadata__`` of the header of ``file`` (one of :attr:`files`), or None: none
        recorded, or pickled weights."""
        return None if self.pickled else self._handle(file).metadata()

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "CheckpointWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def dtype_code(dtype, name: str) -> str:
    """The safetensors dtype code (``"F32"``, ``"BF16"``...) of a torch dtype; ``name`` goes into the error."""
    code = _DTYPE_CODES.get(str(dtype).replace("torch.", ""))
    if code is None:
        raise ConfigError(f"Tensor {name!r} has dtype {dtype}, which safetensors cannot store.")
    return code


def meta_model(directory: str):
    """The model of ``directory``'s config.json, built on the meta device: names and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as error:
        raise ConfigError(f"{directory} has no readable model config.json ({first_line(error)}).") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -- writing -------------------------------------------------------------------------------------------

def safetensors_name(pickle_name: str) -> str:
    """The safetensors file that stands for a pickled one: ``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``."""
    stem = pickle_name[: -len(".bin")] if pickle_name.endswith(".bin") else pickle_name
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def write_safetensors(path: str, names: Sequence[str], meta: Callable[[str], tuple[tuple[int, ...], str]],
                      produce: Callable[[str], Any], metadata: dict | None) -> None:
    """Write a safetensors file tensor by tensor: the header first (``meta(name)`` gives each
    tensor's shape and dtype code), then each tensor's bytes as ``produce(name)`` makes it, one
    tensor held at a time.

        >>> import os, tempfile, torch
        >>> from safetensors.torch import load_file
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> write_safetensors(path, ["a"], lambda n: ((2,), "F32"), lambda n: torch.ones(2), {"format": "pt"})
        >>> load_file(path)["a"]
        tensor([1., 1.])
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        shape, code = meta(name)
        size = _numel(shape) * _itemsize(code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            tensor = produce(name)
            shape, code = meta(name)
            if tuple(tensor.shape) != tuple(shape) or dtype_code(tensor.dtype, name) != code:
                raise HFTError(f"internal: tensor {name!r} changed shape or dtype while writing")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(_uint8()).numpy()))
            del tensor  # hold one tensor at a time


def _uint8():
    import torch

    return torch.uint8


_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(code: str) -> int:
    if code not in _ITEMSIZES:
        raise ConfigError(f"safetensors dtype {code} is not supported by hft half-reset.")
    return _ITEMSIZES[code]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# -- stored names -> in-memory names -----------------------------------------------------------------

@dataclasses.dataclass
class StoredGroup:
    """Stored tensors that make in-memory tensors together: one stored key renamed (``converter``
    is None), or several (one per expert) merged by a transformers ``WeightConverter``."""

    names: tuple[str, ...]  # the in-memory names it makes; the first is transformers' "layer name"
    sources: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (stored key, matched pattern)
    converter: Any = None


class ConvertedCheckpoint:
    """The tensors of a checkpoint under the names the model ``model`` has in memory.

    Stored keys are renamed and grouped exactly as ``from_pretrained`` does it (transformers'
    ``get_model_conversion_mapping`` and ``rename_source_key``, keys in transformers' natural
    order), and a group is converted only when :meth:`load` is called, so one in-memory tensor is
    held at a time. With a transformers that has no conversion mapping (before 5), stored names
    are the in-memory names.

    Args:
        weights: the checkpoint's :class:`CheckpointWeights`.
        model: the model the checkpoint holds, e.g. :func:`meta_model` of the folder (meta device
            is enough: only its names, shapes and class are read).
    """

    def __init__(self, weights: CheckpointWeights, model):
        self.weights = weights
        self.model = model
        self.unplaced: list[str] = []  # stored keys that make no tensor of the model
        self._group_of: dict[str, StoredGroup] = {}
        self.groups: list[StoredGroup] = []
        self.conversion = self._group(weights.names())

    def _group(self, keys: list[str]) -> str:
        """Fill the groups; returns how stored names were mapped, in words."""
        expected = self.model.state_dict()  # on the meta device: names and shapes only
        try:
            import transformers
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
        except ImportError:  # no conversion mapping in this transformers: names are stored as they are
            for key in keys:
                self._add(key, key, None, None, expected)
            return "stored names used as they are (this transformers has no checkpoint conversion mapping)"

        mapping = get_model_conversion_mapping(self.model)
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = self.model.base_model_prefix
        # The order from_pretrained collects keys in: experts 0, 1, ..., 10 are stacked in that order.
        for key in sorted(keys, key=dot_natural_key):
            # Positional arguments: the same call in transformers 5.3 (prefix) and 5.25 (base_model_prefix).
            name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if name not in expected and key in expected:  # as from_pretrained: a key already in memory form stays
                name, pattern = rename_source_key(key, [], [], prefix, expected)
            self._add(key, name, pattern, by_pattern.get(pattern) if pattern is not None else None, expected)
        if not any(g.converter is not None for g in self.groups):
            return "stored names are the model's"
        return (f"stored keys merged into the model's tensors by transformers {transformers.__version__}'s "
                f"conversion mapping for {self.model.config.model_type}, as from_pretrained merges them")

    def _add(self, key: str, name: str, pattern: str | None, converter, expected) -> None:
        if name not in expected:
            self.unplaced.append(key)
            return
        group = self._group_of.get(name)
        if group is None:
            if converter is None:
                names = (name,)
            else:  # a one-to-many converter (a fused tensor split) makes every target; the key names the first
                first = converter.target_patterns[0]
                names = tuple(name.replace(first, t) for t in converter.target_patterns)
            group = StoredGroup(names, converter=converter)
            self.groups.append(group)
            for n in names:
                self._group_of[n] = group
        elif converter is None or group.converter is None:
            raise ConfigError(
                f"{self.weights.label} stores two tensors that both load as {name!r}: "
                f"{group.sources[0][0]!r} and {key!r}; remove the stale one (transformers would load only one of them)."
            )
        group.sources.append((key, pattern if pattern is not None else key))

    def __contains__(self, name: object) -> bool:
        return name in self._group_of

    def names(self) -> list[str]:
        """The in-memory names this checkpoint holds, in its stored order."""
        return [n for g in self.groups for n in g.names]

    def group(self, name: str) -> StoredGroup:
        return self._group_of[name]

    def sources(self, name: str) -> list[str]:
        """The stored keys the in-memory tensor ``name`` is made from."""
        return [key for key, _ in self._group_of[name].sources]

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of ``name`` read from the header alone: known when it is stored as it is."""
        group = self._group_of[name]
        return self.weights.meta(group.sources[0][0])[0] if group.converter is None else None

    def load(self, group: StoredGroup) -> dict[str, Any]:
        """Read and convert one group: in-memory name -> tensor."""
        if group.converter is None:
            return {group.names[0]: self.weights.get(group.sources[0][0])}
        converter = copy.deepcopy(group.converter)  # a fresh one per group, as from_pretrained does
        for key, pattern in group.sources:
            # a callable: transformers' converter reads it when it converts (its synchronous loading path)
            converter.add_tensor(group.names[0], key, pattern, functools.partial(self.weights.get, key))
        try:
            out = converter.convert(group.names[0], model=self.model, config=self.model.config)
        except Exception as error:  # a stored tensor of the wrong shape for its neighbours, a damaged file
            raise SelectionMismatchError(
                f"{self.weights.label}: transformers cannot build {group.names[0]!r} from its "
                f"{len(group.sources)} stored tensors (e.g. {group.sources[0][0]!r}): {first_line(error)}. "
                "The checkpoint does not hold the model its config.json describes."
            ) from None
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
