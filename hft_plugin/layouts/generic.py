"""The generic layout: reads architectures no named rule covers, from module structure alone.

**Layers.** The layers are the repeated blocks: every ``nn.ModuleList`` whose items are blocks
(modules holding parameters in two or more submodules), that is not nested inside another such
list. A model with several stacks (a vision tower and a language model, the two recurrent modules
of HRM, BLT's local encoder, global transformer and local decoder) gets all of them, one after the
other; parallel lists of one length under one parent (XLM's ``attentions[i]``, ``ffns[i]``,
``layer_norm1[i]``) are zipped into one layer each. Lists of single modules (Gemma 3n's AltUp
projections) are not blocks: they stay outside the layers with the embeddings.

**Roles.** Inside a block each module that owns parameters is placed by the first word of its path
that names a role, read outside-in (``mlp.gate`` is in the MLP, ``self_attn.q_proj`` in attention),
then by its own and its ancestors' class names:

- ``norm``: normalisation modules (class name with "Norm", or ``ln_1``/``layer_norm``-like names) at
  the block level, and everything inside them. A norm inside a token mixer or MLP (``q_norm``)
  belongs to that role and trains with its projection (``q_proj``) where one matches its name.
- ``router``: in a mixture of experts, the module that scores the experts (a class named Router,
  or a ``gate``/``router`` beside an ``experts`` module), with everything inside it, and the
  shared-expert gate.
- ``mlp``: MLPs, experts and shared experts (``mlp``, ``ffn``, ``feed_forward``, ``experts``,
  ``fc1``, ``intermediate``, ...).
- ``attention``: every token mixer: attention, cross-attention, linear attention, Mamba/SSM mixers,
  RWKV time mixing, RG-LRU, short convolutions, xLSTM cells.
- ``other``: what no word names (Gemma 3n's AltUp and LAuReL, Zamba's shared-block projection,
  hyper-connection weights...). The category strategy balances it like any role.

**Units.** A module is one unit (weight with bias). Known fused tensors are split: stacked experts
``(E, ...)`` into one unit per expert (its gate, up and down train together), a dense
``gate_up_proj`` into its ``[gate | up]`` halves. A module that owns several matrices directly
(XLNet's ``q, k, v, o, r``) has one unit per matrix. Fused ``qkv`` tensors stay whole: their row
order differs from family to family (contiguous, per head, per group), and freezing them whole is
exact; a named layout splits the ones whose order it knows.

**Never a guess.** A model with no list of blocks, or a layer whose parameters form a single unit
(a list mixing blocks with a bare fused tensor), cannot be split in halves: the reader raises
LayoutError naming the parameters (register a layout with the hft_read_layout hook).

Example:
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hft_plugin.layouts.generic import read_generic
    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", num_hidden_layers=2))
    >>> layout = read_generic(model)
    >>> len(layout.layers), sorted({u.role for u in layout.units()})
    (2, ['attention', 'norm'])
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterator

from torch import nn

from ..errors import LayoutError
from .base import Layout, gc_paused, param_shape
from .reader import Placement, Root, Splitter, equal_split, read_with, split_along

NAME = "generic"

# Words of a module path component (split on "_" and digits) that name a role.
_MIXER_WORDS = frozenset({
    "attn", "attention", "attentions", "att", "mixer", "mamba", "ssm", "mlstm", "slstm", "lstm",
    "rnn", "recurrent", "temporal", "rglru", "lru", "retention", "conv", "sconv", "wqkv", "qkv",
    "query", "key", "value", "timemix",
})
_MLP_WORDS = frozenset({
    "mlp", "mlps", "ffn", "ffns", "ff", "feed", "feedforward", "experts", "expert", "moe",
    "intermediate", "fc", "channel",
})
# Whole components with a role of their own.
_MIXER_COMPONENTS = frozenset({
    "q_lin", "k_lin", "v_lin", "out_lin", "self_att", "rel_attn", "c_attn", "q_proj", "k_proj",
    "v_proj", "o_proj", "qkv_proj", "kv_proj", "out_proj", "query_key_value",
})
_MLP_COMPONENTS = frozenset({
    "c_fc", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "fc_in", "fc_out", "output", "wi", "wo", "layer_1", "layer_2", "lin1", "lin2",
})
_CLASS_MIXER = re.compile(r"attention|attn|mixer|mamba|ssm|lstm|rnn|recurrent|rglru|lru|conv|retention|deltanet|timemix", re.I)
_CLASS_MLP = re.compile(r"mlp|ffn|feedforward|expert|moe", re.I)
_CONTAINER_CLASS = re.compile(r"(Layer|Block|Decoder|Encoder|Model|Module|Stack|Transformer)$")
_MOE_CLASS = re.compile(r"moe|moa|expert|sparse", re.I)
_ROUTER_NAMES = frozenset({"gate", "router", "gating", "router_gate", "moe_gate", "switch"})
_NORM_NAME = re.compile(r"(^|_)(ln\d*|ln_\w+|norm\d*|\w*layernorm\w*|layer_norm\d*|\w+_norm)$", re.I)
_EXPERT_COUNT_NAMES = (
    "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
    "n_experts",
)


@dataclasses.dataclass(frozen=True)
class _Context:
    """What the classifier needs to know about one module beyond its path."""

    ancestors: tuple[nn.Module, ...]  # from the root of the layer down to the parent
    siblings: frozenset[str]  # names of the parent's other children


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the classifier needs to know about the whole model."""

    experts: frozenset[int]  # expert counts its config names (a stack of E experts has dim 0 == E)
    class_name: str  # e.g. "GraniteMoeHybridForCausalLM": its family prefix is no role word

    def local(self, module: nn.Module) -> str:
        """A module's class name without the family prefix: GraniteMoeHybridMambaLayer -> MambaLayer."""
        return _strip_family(type(module).__name__, self.class_name)


def read_generic(model: nn.Module) -> Layout:
    """Read any transformer-like ``model`` into layers and roles (see the module docstring)."""
    with gc_paused():
        return _read(model)


def _read(model: nn.Module) -> Layout:
    config = getattr(model, "config", None)
    layers = find_stacks(model)
    if not layers:
        raise LayoutError(
            f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of modules with "
            "parameters). Register a layout for it with the hft_read_layout hook."
        )
    contexts = _contexts(layers)
    info = _Model(_expert_counts(model, config), type(model).__name__)
    layout = read_with(
        model, NAME, lambda path, module: classify(path, module, contexts[id(module)], info), layers
    )
    _check_splittable(layout)
    return layout


# -- layers --------------------------------------------------------------------------------------


def find_stacks(model: nn.Module) -> list[list[Root]]:
    """Every layer of every stack of blocks in ``model``, in module order (see the module docstring)."""
    lists = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and _has_params(module)
    ]
    names = [n for n, _ in lists]
    top = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o in names if o != n)]
    groups: dict[tuple[str, int], list[tuple[str, nn.ModuleList]]] = {}
    for name, module in top:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault((parent, len(module)), []).append((name, module))
    layers: list[list[Root]] = []
    for (parent, length), members in groups.items():
        if not any(_is_block_list(m) for _, m in members):
            continue
        for index in range(length):
            roots = []
            for name, module in members:
                seen_as = "" if len(members) == 1 else name.rsplit(".", 1)[-1]
                roots.append((f"{name}.{index}", seen_as, module[index]))
            layers.append(roots)
    return layers


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_block_list(module_list: nn.ModuleList) -> bool:
    """Items are blocks when some item holds parameters in two or more of its modules, or two or
    more matrices in one: a list of Linear or Embedding modules is no stack of blocks."""
    for item in module_list:
        owners = sum(1 for m in item.modules() if next(m.parameters(recurse=False), None) is not None)
        if owners >= 2 or sum(1 for p in item.parameters(recurse=False) if len(param_shape(p)) >= 2) >= 2:
            return True
    return False


def _contexts(layers: list[list[Root]]) -> dict[int, _Context]:
    contexts: dict[int, _Context] = {}
    for roots in layers:
        for _prefix, _base, root in roots:
            _walk(root, (), frozenset(), contexts)
    return contexts


def _walk(module: nn.Module, ancestors: tuple[nn.Module, ...], siblings: frozenset[str], out: dict[int, _Context]) -> None:
    out.setdefault(id(module), _Context(ancestors, siblings))
    children = dict(module.named_children())
    names = frozenset(children)
    for name, child in children.items():
        _walk(child, ancestors + (module,), names - {name}, out)


# -- roles ---------------------------------------------------------------------------------------


def classify(path: str, module: nn.Module, context: _Context, model: _Model) -> Placement:
    """Place one module of a block by its path (as seen in the block), class names and shapes."""
    components = path.split(".") if path else []
    leaf = components[-1] if components else ""
    # the class of the module at each component; a parallel list's name (XLM's "attentions") is
    # the layer's root, otherwise the root ("...DecoderLayer", "MambaBlock") has no component: its
    # class says nothing about one module's role
    chain = context.ancestors + (module,)
    offset = len(components) - (len(chain) - 1)
    classes = [model.local(chain[i + 1 - offset]) for i in range(len(components))]
    if any(_is_norm_name(c) for c in components) or any("norm" in c.lower() for c in classes):
        # a norm, or inside one (AXK2's input_layernorm holds an MLP)
        target = _norm_target(leaf, context)
        if target is not None:  # q_norm, k_norm: train with q_proj, k_proj
            return (_role(components, classes) or "other", None, ".".join(components[:-1] + [target]))
        return ("norm", None, None)
    if _is_router(components, module, context, model):
        return ("router", None, None)
    role = _role(components, classes) or "other"
    shapes = [param_shape(p) for p in module.parameters(recurse=False)]
    if _in_experts(components, classes):
        splitter = _expert_splitter(shapes, model.experts)
        if splitter is not None:
            return ("attention" if role == "attention" else "mlp", splitter, None)
    if leaf == "gate_up_proj" and isinstance(module, nn.Linear):
        return (role, equal_split(("gate", "up")), None)
    if leaf == "in_proj" and isinstance(module, nn.Linear) and context.ancestors:
        splitter = _mamba_in_proj(module, context.ancestors[-1])
        if splitter is not None:
            return (role, splitter, None)
    if sum(1 for s in shapes if len(s) >= 2) >= 2:
        return (role, _by_parameter, None)
    return (role, None, None)


def _role(components: list[str], classes: list[str]) -> str | None:
    """"attention" or "mlp" from the outermost component whose module's class or whose name names
    one: NemotronH's ``mixer`` is a Mamba mixer, attention, an MLP or a MoE by its class."""
    for component, cls in zip(components, classes):
        role = _class_role(cls) or _component_role(component)
        if role:
            return role
    return None


def _component_role(component: str) -> str | None:
    lowered = component.lower()
    if lowered in _MLP_COMPONENTS:
        return "mlp"
    if lowered in _MIXER_COMPONENTS:
        return "attention"
    words = set(re.split(r"[_\d]+", lowered)) - {""}
    if words & _MLP_WORDS:
        return "mlp"
    if words & _MIXER_WORDS:
        return "attention"
    return None


def _class_role(cls: str) -> str | None:
    if _CONTAINER_CLASS.search(cls):  # Zamba2's AttentionDecoderLayer holds an MLP too
        return None
    if _CLASS_MLP.search(cls):
        return "mlp"
    if _CLASS_MIXER.search(cls):
        return "attention"
    return None


def _is_norm_name(component: str) -> bool:
    return bool(_NORM_NAME.search(component))


def _norm_target(leaf: str, context: _Context) -> str | None:
    """The projection a norm inside a mixer normalises: ``q_norm`` -> ``q_proj``,
    ``kv_a_layernorm`` -> ``kv_a_proj_with_mqa``; None for a norm of the block."""
    stem = re.sub(r"_?(layer_?norm|norm|ln)$", "", leaf, flags=re.I)
    if not stem or stem == leaf or not context.ancestors:
        return None
    parent = context.ancestors[-1]
    for name in sorted(context.siblings):
        if name.startswith(stem + "_") and not _is_norm_name(name):
            sibling = getattr(parent, name, None)
            if isinstance(sibling, nn.Module) and next(sibling.parameters(recurse=False), None) is not None:
                return name
    return None


def _is_router(components: list[str], module: nn.Module, context: _Context, model: _Model) -> bool:
    """The module scoring experts, or inside it: a Router class, or a gate/router beside experts."""
    if any("router" in model.local(m).lower() for m in context.ancestors[1:] + (module,)):
        return True
    # components may start with a parallel list's name that is no module of the layer
    offset = len(components) - len(context.ancestors)
    for i, component in enumerate(components):
        lowered = component.lower()
        if lowered in ("shared_expert_gate", "shared_experts_gate"):
            return True
        if i - offset < 0 or not (lowered in _ROUTER_NAMES or lowered.endswith("_router")):
            continue
        parent = context.ancestors[i - offset]
        if _MOE_CLASS.search(model.local(parent)) or any(
            "expert" in name.lower() for name, _ in parent.named_children() if name != component
        ):
            return True
    return False


def _in_experts(components: list[str], classes: list[str]) -> bool:
    if any("expert" in c.lower() and "shared" not in c.lower() for c in components):
        return True
    return bool(classes) and "expert" in classes[-1].lower() and "shared" not in classes[-1].lower()


def _expert_counts(model: nn.Module, config: Any) -> frozenset[int]:
    counts = set()
    for cfg in _configs(config):
        for name in _EXPERT_COUNT_NAMES:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 1:
                counts.add(value)
    return frozenset(counts)


def _configs(config: Any) -> Iterator[Any]:
    """The config and its sub-configs (text_config of a multimodal model, attention configs...)."""
    if config is None:
        return
    yield config
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            yield from _configs(value)


def _expert_splitter(shapes: list[tuple[int, ...]], experts: frozenset[int]) -> Splitter | None:
    """One unit per expert when every matrix the module owns stacks experts along dim 0: as many as
    the config names, or any number in a 3-D stack. Expert e's unit holds slice e of each stack.
    The stacks need not be equally long: under transformers <= 5.24 LongCat-Flash's ``gate_up_proj``
    also stacks one slice per "zero expert" (an identity, never computed), which ``down_proj``
    lacks; each such slice is a unit of its own, so every element still lies in exactly one unit.
    From 5.25 on the zero experts have no slices and the units are the routed experts."""
    matrices = [s for s in shapes if len(s) >= 2]
    counts = {s[0] for s in matrices}
    if not counts or min(counts) < 2:
        return None
    if any(c not in experts and not any(len(s) >= 3 and s[0] == c for s in matrices) for c in counts):
        return None

    def split(pname: str, shape: tuple[int, ...]):
        if not shape or shape[0] not in counts:  # not stacked: rides whole with the module's own unit
            return [("", None)]
        return _expert_pieces(shape[0])

    return split


def _mamba_in_proj(in_proj: nn.Linear, mixer: nn.Module) -> Splitter | None:
    """The parts of a Mamba mixer's fused input projection, sized by the mixer's own attributes.

    Mamba-2 mixers (Mamba2, Bamba, FalconH1, NemotronH, GraniteMoeHybrid, Zamba2) project to
    ``[z | xBC | dt]`` of sizes (intermediate_size, conv_dim, num_heads); Mamba-1 mixers (Mamba,
    FalconMamba, Jamba: those with ``x_proj`` and ``dt_proj`` modules) to ``[x | z]`` halves. Any
    other layout (Zamba's interleaved heads) stays whole.
    """
    out = in_proj.out_features
    inner = getattr(mixer, "intermediate_size", None)
    conv_dim = getattr(mixer, "conv_dim", None)
    heads = getattr(mixer, "num_heads", None)
    if not isinstance(inner, int):
        return None
    if isinstance(conv_dim, int) and isinstance(heads, int) and inner + conv_dim + heads == out:
        return split_along(lambda _p, _s: 0, lambda _total: [("z", inner), ("xBC", conv_dim), ("dt", heads)])
    if (out == 2 * inner and conv_dim is None and isinstance(getattr(mixer, "x_proj", None), nn.Linear)
            and isinstance(getattr(mixer, "dt_proj", None), nn.Linear)):
        return equal_split(("x", "z"))
    return None


@functools.lru_cache(maxsize=4096)
def _strip_family(name: str, model_class: str) -> str:
    """``name`` without the CamelCase words it shares with the model's class name at the start."""
    common = 0
    while common < min(len(name), len(model_class)) and name[common] == model_class[common]:
        common += 1
    cut = next((i for i in range(common, 0, -1) if i < len(name) and name[i].isupper()), 0)
    return name[cut:]


@functools.lru_cache(maxsize=64)
def _expert_pieces(count: int) -> tuple[tuple[str, tuple], ...]:
    return tuple((str(e), (((0, e, e + 1),),)) for e in range(count))


def _by_parameter(pname: str, shape: tuple[int, ...]):
    """One unit per matrix of a module that owns several; ``x_weight`` and ``x_bias`` stay together."""
    return [(re.sub(r"_(weight|bias)$", "", pname), None)]


# -- checks --------------------------------------------------------------------------------------


def _check_splittable(layout: Layout) -> None:
    for layer in layout.layers:
        if len(layer) == 1:
            unit = layer[0]
            params = sorted({p.param for p in unit.parts})
            raise LayoutError(
                f"The generic layout cannot split the block holding {', '.join(params[:8])}: its "
                "parameters form a single unit, so no half of it can train alone. Register a layout "
                "for this architecture with the hft_read_layout hook (see hft_plugin.hookspecs)."
            )
