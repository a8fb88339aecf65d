"""Carry a selection to another tool, in that tool's own config form, exactly or not at all.

Axolotl freezes by ``unfrozen_parameters`` (``axolotl/utils/freeze.py``, ``freeze_layers_except``):

* each entry is a regex matched with ``re.match`` against every name of ``model.named_parameters()``,
  so it is anchored at the start; ``$`` anchors the end. Every ``.`` not followed by ``+`` is a
  literal dot (Axolotl escapes it), so names are written with plain dots, not ``\\.``;
* an entry may end in ``[start:end]`` (after the ``$``): only indices ``start:end`` along
  **dimension 0** of that parameter train; Axolotl zeroes the gradient of the other rows in a hook.
  Dimension 0 is the output rows of a ``Linear`` weight ``(out, in)``, but the *input* rows of a
  GPT-2 ``Conv1D`` weight ``(in, out)``, and the expert index of a stacked expert tensor
  ``(experts, ...)``. Several entries for one parameter add their ranges.

Spectrum (cognitivecomputations/spectrum) writes the same ``unfrozen_parameters:`` YAML for Axolotl,
of whole parameters only: it has no ranges.

A selection trains whole tensors (one anchored regex each) and, for fused tensors, regions. A region
that is a union of whole dimension-0 slices becomes row ranges in Axolotl's form; any other region
(columns of a Conv1D ``c_attn``, the gate half of one expert in a stacked ``gate_up_proj``), and any
region at all for Spectrum, cannot be expressed: :func:`axolotl` and :func:`spectrum` return it
in ``Export.inexpressible`` with the reason, and :meth:`Export.render` refuses to print a partial
export unless asked to (the tensors left out then stay frozen whole in the other tool).

Example:
    >>> from hft_plugin import select_half
    >>> from hft_plugin.testing import tiny_model
    >>> export = axolotl(select_half(tiny_model("phi3"), round=0))
    >>> export.entries[0], export.inexpressible
    ('^model.embed_tokens.weight$', {})
    >>> [e for e in export.entries if "layers.0.self_attn.qkv_proj" in e]  # q (rows 0:64) and k (64:96) train
    ['^model.layers.0.self_attn.qkv_proj.weight$[0:96]']
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Sequence

from .boxes import describe, ranges
from .errors import HFTError

if TYPE_CHECKING:
    from .selection import Selection

FORMATS = ("axolotl", "spectrum")

# Names Axolotl's pattern syntax can carry literally: its only rewrite is "." -> "\." (except ".+").
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class ExportError(HFTError):
    """The selection cannot be written exactly in the requested tool's form."""


@dataclasses.dataclass(frozen=True)
class Export:
    """A selection in one tool's ``unfrozen_parameters`` form.

    Attributes:
        tool: ``"axolotl"`` or ``"spectrum"``.
        entries: the patterns, in the model's parameter order: ``^name$`` for a whole tensor,
            ``^name$[start:end]`` for a row range (Axolotl only).
        inexpressible: trainable tensors the form cannot carry exactly, by name, with the reason.
    """

    tool: str
    entries: tuple[str, ...]
    inexpressible: dict[str, str]

    def render(self, header: Sequence[str] = (), *, expressible_only: bool = False) -> str:
        """The YAML text: ``unfrozen_parameters:`` and one entry a line, ``header`` as comments.

        Raises:
            ExportError: some trainable tensor cannot be expressed and ``expressible_only`` is False.
        """
        import yaml

        if self.inexpressible and not expressible_only:
            raise ExportError(self.problem())
        comments = [f"# {line}" for line in header]
        if self.inexpressible:
            comments.append(f"# Left out ({_TOOL_NAMES[self.tool]} cannot express them; they stay frozen whole there):")
            comments += [f"#   {name}: {why}" for name, why in self.inexpressible.items()]
        if any(e.endswith("]") for e in self.entries):
            comments.append("# Rows outside a [start:end] range get a zero gradient in Axolotl; weight decay still moves "
                            "them: set weight_decay: 0 to keep them still, as HFT does.")
        body = yaml.safe_dump({"unfrozen_parameters": list(self.entries)}, sort_keys=False,
                              default_flow_style=False, width=10_000)
        return "\n".join(comments + [body.rstrip("\n")]) + "\n"

    def problem(self) -> str:
        """What cannot be expressed, in one line per tensor after a first line that says what to do."""
        tool = _TOOL_NAMES[self.tool]
        lines = [f"{tool} cannot express the trainable part of {len(self.inexpressible)} tensor(s) exactly; pass "
                 "--expressible-only to print the rest (these then stay frozen whole there), or choose a selection "
                 "without them (e.g. --strategy layer trains whole layers):"]
        lines += [f"  {name}: {why}" for name, why in self.inexpressible.items()]
        return "\n".join(lines)


_TOOL_NAMES = {"axolotl": "Axolotl", "spectrum": "Spectrum"}


def axolotl(selection: "Selection") -> Export:
    """The selection as Axolotl's ``unfrozen_parameters``: whole tensors, and dimension-0 ranges of
    fused tensors; a region that is not whole dimension-0 slices is returned as inexpressible."""
    return _export(selection, "axolotl")


def spectrum(selection: "Selection") -> Export:
    """The selection as Spectrum's ``unfrozen_parameters`` YAML: whole tensors only; every fused
    tensor trained in part is returned as inexpressible."""
    return _export(selection, "spectrum")


def export(selection: "Selection", tool: str) -> Export:
    """:func:`axolotl` or :func:`spectrum` by name; raises ExportError for another name."""
    if tool not in FORMATS:
        raise ExportError(f"unknown export format {tool!r}; known: {', '.join(FORMATS)}")
    return _export(selection, tool)


def _export(selection: "Selection", tool: str) -> Export:
    plan = selection.plan()
    shapes = selection.layout.shapes
    trainable = set(plan.trainable)
    entries: list[str] = []
    inexpressible: dict[str, str] = {}
    for name, shape in shapes.items():  # the model's parameter order
        if name not in trainable and name not in plan.partial:
            continue
        if not _PLAIN_NAME.match(name):
            inexpressible[name] = "its name has characters other than letters, digits, '_' and '.'"
            continue
        if name in trainable:
            entries.append(f"^{name}$")
            continue
        boxes = plan.partial[name]
        if tool == "spectrum":
            inexpressible[name] = f"trains only {describe(shape, boxes)} (Spectrum lists whole tensors)"
            continue
        rows = ranges(shape, boxes, dim=0)
        if rows is None:
            inexpressible[name] = (f"trains {describe(shape, boxes)}, not whole slices of dimension 0 "
                                   "(Axolotl's [start:end] ranges slice dimension 0 only)")
            continue
        entries += [f"^{name}$[{start}:{stop}]" for start, stop in rows]
    _check_unambiguous(entries, shapes)
    return Export(tool, tuple(entries), inexpressible)


def _check_unambiguous(entries: list[str], shapes: dict) -> None:
    """Each anchored pattern must match its own parameter only, whether a tool reads its dots as
    literal (Axolotl) or as regex wildcards (a plain ``re.match`` loop)."""
    names = list(shapes)
    for entry in entries:
        own = entry[1:entry.index("$")]
        loose = re.compile(entry[:entry.index("$") + 1])
        others = [n for n in names if n != own and len(n) == len(own) and loose.match(n)]
        if others:
            raise ExportError(f"the pattern {entry} would also match {others[0]}; this model's parameter names "
                              "cannot be told apart by anchored patterns")


# -- the model card ---------------------------------------------------------------------------------------
MODEL_CARD_HEADING = "## Half Fine-Tuning"


def model_card_section(selection: "Selection", stats: dict | None = None) -> str:
    """A model card section (Markdown) saying the model was half fine-tuned: round, strategy,
    ratio, seed, and the shares that trained (``stats``: default ``selection.stats()``).

        >>> from hft_plugin import select_half
        >>> from hft_plugin.testing import tiny_model
        >>> print(model_card_section(select_half(tiny_model("llama"), round=1)), end="")  # doctest: +ELLIPSIS
        ## Half Fine-Tuning
        <BLANKLINE>
        This model was trained with Half Fine-Tuning (HFT; Hui et al., ACL 2025, ...) through hft-plugin: round 1, strategy `category`, ratio 0.5, seed 0. ...
    """
    s = selection.stats() if stats is None else stats
    c = selection.config
    outside = ("the embeddings, lm_head and final norm trained too" if s["outside_trainable_params"]
               else "the embeddings, lm_head and final norm stayed frozen")
    return (
        f"{MODEL_CARD_HEADING}\n\n"
        "This model was trained with Half Fine-Tuning (HFT; Hui et al., ACL 2025, "
        "[arXiv:2404.18466](https://arxiv.org/abs/2404.18466)) through hft-plugin: "
        f"round {c.round}, strategy `{c.strategy}`, ratio {c.ratio:g}, seed {c.seed}. "
        f"{s['trainable_ratio']:.2%} of the transformer layers' parameters trained and the rest stayed as they "
        f"were; {outside}, so {s['overall_ratio']:.2%} of all parameters trained "
        f"({s['trainable_params']:,} of {s['total_params']:,}). Which tensors trained is recorded in "
        "`hft_selection.json` beside the weights.\n"
    )


def with_model_card_section(card: str, section: str) -> str:
    """``card`` (a README.md's text) with ``section`` at its end, replacing an earlier one."""
    start = card.find(MODEL_CARD_HEADING)
    if start != -1:
        following = card.find("\n## ", start + len(MODEL_CARD_HEADING))
        card = card[:start] + (card[following + 1:] if following != -1 else "")
    return card.rstrip("\n") + "\n\n" + section


# TRL links the base model only when it is a Hub id; for a model object or a local folder its
# template writes "a fine-tuned version of [None](https://huggingface.co/None)"
_NO_BASE_MODEL = re.compile(
    r"This model is a fine-tuned version of \[None\]\(https://huggingface\.co/None\)(?P<rest>[^\n]*?)\.[ \t]*")


def with_base_model(card: str, base_model: str | None) -> str:
    """``card`` with TRL's "fine-tuned version of [None](https://huggingface.co/None)" naming
    ``base_model`` (a local model's folder name, without a link: it is no Hub id) or, without
    one, left out (keeping the dataset it names, if any). A card naming its base is unchanged.

        >>> with_base_model("This model is a fine-tuned version of [None](https://huggingface.co/None).", "my-llama")
        'This model is a fine-tuned version of the local model `my-llama`.'
        >>> with_base_model("This model is a fine-tuned version of [None](https://huggingface.co/None) on the "
        ...                 "[d](https://huggingface.co/datasets/d) dataset.", None)
        'This model was fine-tuned on the [d](https://huggingface.co/datasets/d) dataset.'
    """
    def replace(match: re.Match) -> str:
        rest = match.group("rest")
        if base_model:
            return f"This model is a fine-tuned version of the local model `{base_model}`{rest}."
        return f"This model was fine-tuned{rest}." if rest.strip() else ""

    return _NO_BASE_MODEL.sub(replace, card)


def base_model_name(model) -> str | None:
    """The name to give a model's base in its card: the last component of the local folder it was
    loaded from (``name_or_path`` / ``config._name_or_path``; the full path could be private), or
    None for a model built from a config."""
    import os

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(path, str) or not path.strip():
        return None
    return os.path.basename(os.path.normpath(path)) or None


def add_model_card_section(path: str, selection: "Selection", stats: dict | None = None,
                           base_model: str | None = None) -> None:
    """Append (or replace) the HFT section of the model card at ``path`` (a README.md a trainer
    wrote), and fill in or leave out a base model the trainer wrote as "[None]" (see
    :func:`with_base_model`); a missing file is left missing."""
    import os

    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        card = f.read()
    card = with_base_model(card, base_model)
    with open(path, "w", encoding="utf-8") as f:
        f.write(with_model_card_section(card, model_card_section(selection, stats)))
