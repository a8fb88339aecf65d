"""Pictures of a selection: a layer x unit grid, as a text table and as a heatmap.

Rows are the transformer layers, columns the units inside a layer (``q k v o | gate up down |
norms``), ordered by their role (attention, mlp, router, norm, other). A fused tensor's parts get
their own columns (``qkv_proj:q`` is the ``q`` column), and the many experts of a mixture of
experts are summarised per matrix, e.g. ``2/8`` experts' gate matrices train in that layer.

    >>> from hft_plugin.testing import tiny_model
    >>> from hft_plugin import select_half
    >>> grid = layer_grid(select_half(tiny_model("llama"), round=0))
    >>> grid.columns
    ['q', 'k', 'v', 'o', 'gate', 'up', 'down', 'input_norm', 'post_attn_norm']
    >>> print(render_table(grid).splitlines()[1])  # doctest: +NORMALIZE_WHITESPACE
    layer  q  k  v  o  gate  up  down  input_norm  post_attn_norm  trained
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Sequence

from .layouts.base import ROLES

if TYPE_CHECKING:
    from .freeze import HFTHandle
    from .selection import Selection

# Short column names for the units every decoder layer has under some name.
_SHORT = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "pre_mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
    "q_norm": "q_norm",
    "k_norm": "k_norm",
}
# Where the usual units sit in a row; other columns follow in model order.
_CANONICAL = ("q", "k", "v", "o", "experts.gate", "experts.up", "experts.down", "gate", "up", "down",
              "router", "input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")
_EXPERT_PIECE = re.compile(r"^(\d+)(?:\.(.+))?$")  # "3.gate" -> expert 3, matrix gate


@dataclasses.dataclass
class Cell:
    """What trains in one (layer, column): units and parameter counts."""

    units: int = 0
    trained_units: int = 0
    numel: int = 0
    trained_numel: int = 0

    @property
    def share(self) -> float:
        """The trained share of this cell's parameters, 0.0 to 1.0."""
        return self.trained_numel / self.numel if self.numel else 0.0

    def text(self) -> str:
        """``T`` (trains), ``-`` (frozen), or ``k/n`` units for a summarised cell (experts)."""
        if self.units == 1:
            return "T" if self.trained_units else "-"
        return f"{self.trained_units}/{self.units}"


@dataclasses.dataclass
class Grid:
    """The layer x unit map of one selection."""

    columns: list[str]
    column_roles: list[str]  # each column's role: attention, mlp, norm, router, other
    rows: list[list[Cell | None]]  # None: the layer has no such unit
    layer_shares: list[float]
    outside: list[tuple[str, bool]]  # parameters outside the layers, and whether they train
    title: str

    @property
    def column_groups(self) -> list[str]:
        """Deprecated: the former name of :attr:`column_roles`."""
        return self.column_roles


def _layer_prefixes(selection: "Selection") -> list[str]:
    """Each layer's key prefix (e.g. ``model.layers.3.``), read off the unit keys."""
    layers = selection.layout.layers
    first = [layer[0].key.split(".") if layer else None for layer in layers]
    # The layer index sits at the first dotted position where layer 0's and layer 1's keys differ.
    position = None
    if len(layers) > 1 and first[0] and first[1]:
        position = next((i for i, (a, b) in enumerate(zip(first[0], first[1])) if a != b), None)
    prefixes = []
    for index, parts in enumerate(first):
        if parts is None:
            prefixes.append("")
            continue
        at = position if position is not None and position < len(parts) and parts[position] == str(index) else None
        if at is None:
            at = next((i for i, p in enumerate(parts) if p == str(index)), len(parts) - 1)
        prefixes.append(".".join(parts[: at + 1]) + ".")
    return prefixes


def _column(relative: str) -> tuple[str, bool]:
    """The column name of a unit key inside its layer, and whether it summarises many units."""
    module, _, piece = relative.partition(":")
    leaf = module.rsplit(".", 1)[-1]
    if piece:
        expert = _EXPERT_PIECE.match(piece)
        if expert:  # one of many experts: summarised per matrix
            matrix = expert.group(2) or leaf
            return f"{leaf}.{matrix}" if leaf != "experts" else f"experts.{matrix}", True
        return piece, False
    name = _SHORT.get(leaf, leaf)
    return name.removesuffix("_proj") if name.endswith("_proj") else name, False


def layer_grid(selection: "Selection") -> Grid:
    """The layer x unit grid of ``selection`` (see the module docstring)."""
    prefixes = _layer_prefixes(selection)
    raw: list[dict[str, str]] = []  # per layer: relative name -> column, filled below
    by_name: dict[str, tuple[str, str, bool]] = {}  # relative name -> (column, role, summarised)
    for layer, prefix in zip(selection.layout.layers, prefixes):
        names = {}
        for unit in layer:
            relative = unit.key[len(prefix):] if unit.key.startswith(prefix) else unit.key
            names[unit.key] = relative
            if relative not in by_name:
                column, summarised = _column(relative)
                if unit.role == "router" and not summarised:
                    column = "router"
                by_name[relative] = (column, unit.role, summarised)
        raw.append(names)
    # Two units with one short name (GPT-2's attn.c_proj and mlp.c_proj): use the module path instead.
    owners: dict[str, set[str]] = {}
    for relative, (column, _, summarised) in by_name.items():
        owners.setdefault(column, set()).add(relative.partition(":")[0] if summarised else relative)
    for relative, (column, role, summarised) in list(by_name.items()):
        if len(owners[column]) > 1:
            module, _, piece = relative.partition(":")
            full = module if not piece else f"{module}:{piece}"
            if summarised:
                full = f"{module}.{column.split('.', 1)[1]}"
            by_name[relative] = (full, role, summarised)
    columns: list[str] = []
    roles: dict[str, str] = {}
    for column, role, _ in by_name.values():
        if column not in roles:
            columns.append(column)
            roles[column] = role
    order = {r: i for i, r in enumerate(("attention", "mlp", "router", "norm", "other"))}
    first_seen = {c: i for i, c in enumerate(columns)}
    rank = {c: i for i, c in enumerate(_CANONICAL)}
    columns.sort(key=lambda c: (order.get(roles[c], len(ROLES)), rank.get(c, len(rank)), first_seen[c]))
    index = {c: i for i, c in enumerate(columns)}

    rows, shares = [], []
    for layer, names in zip(selection.layout.layers, raw):
        row: list[Cell | None] = [None] * len(columns)
        trained = total = 0
        for unit in layer:
            trains = selection.is_trainable(unit.key)
            i = index[by_name[names[unit.key]][0]]
            cell = row[i] = row[i] or Cell()
            cell.units += 1
            cell.numel += unit.numel
            if trains:
                cell.trained_units += 1
                cell.trained_numel += unit.numel
            total += unit.numel
            trained += unit.numel if trains else 0
        rows.append(row)
        shares.append(trained / total if total else 0.0)
    c = selection.config
    title = f"round {c.round} · {c.strategy} · ratio {c.ratio:g} · seed {c.seed}"
    outside = [(name, c.train_embeddings) for name in selection.layout.outside]
    return Grid(columns, [roles[col] for col in columns], rows, shares, outside, title)


def render_table(grid: Grid) -> str:
    """The grid as a text table: ``T`` trains, ``-`` frozen, ``k/n`` for summarised experts."""
    widths = [max(len(col), 5 if any(r[i] and r[i].units > 1 for r in grid.rows) else 4)
              for i, col in enumerate(grid.columns)]
    header = "layer  " + "  ".join(col.center(w) for col, w in zip(grid.columns, widths)) + "  trained"
    lines = [grid.title, header]
    for number, (row, share) in enumerate(zip(grid.rows, grid.layer_shares)):
        cells = [(cell.text() if cell else "").center(w) for cell, w in zip(row, widths)]
        lines.append(f"{number:>5}  " + "  ".join(cells) + f"  {share:>7.1%}")
    column_shares = []
    for i, w in enumerate(widths):
        cells = [r[i] for r in grid.rows if r[i]]
        numel = sum(c.numel for c in cells)
        share = sum(c.trained_numel for c in cells) / numel if numel else 0.0
        column_shares.append(f"{share:.0%}".center(w))
    lines.append("share  " + "  ".join(column_shares))
    if grid.outside:
        trains = grid.outside[0][1]
        names = ", ".join(name for name, _ in grid.outside)
        lines.append(f"outside the layers ({'train' if trains else 'frozen'}): {names}")
    lines.append("T = trains, - = frozen, k/n = k of n experts train")
    return "\n".join(lines)


def plot_grids(grids: Sequence[Grid], path: str, title: str | None = None) -> str:
    """Draw one heatmap per grid, side by side, into ``path`` (PNG, SVG, PDF: by its suffix).

    Each cell is coloured by the trained share of its parameters (frozen 0 to trained 1);
    summarised expert cells are labelled ``k/n``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    if not grids:
        raise ValueError("plot_grids needs at least one grid")
    n_layers = max(len(g.rows) for g in grids)
    n_cols = max(len(g.columns) for g in grids)
    width = min(4.0 + 0.45 * n_cols * len(grids), 40.0)
    height = min(2.0 + 0.28 * n_layers, 30.0)
    # Grey to blue rather than red to green: readable with the common colour-vision deficiencies.
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("hft", ["#e6e6e6", "#9ecae1", "#08519c"])
    fig, axes = plt.subplots(1, len(grids), figsize=(width, height), squeeze=False, sharey=True)
    image = None
    for ax, grid in zip(axes[0], grids):
        data = np.full((len(grid.rows), len(grid.columns)), np.nan)
        for r, row in enumerate(grid.rows):
            for c, cell in enumerate(row):
                if cell is not None:
                    data[r, c] = cell.share
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(grid.rows)), [str(i) for i in range(len(grid.rows))], fontsize=7)
        ax.set_title(grid.title, fontsize=9)
        for r, row in enumerate(grid.rows):
            for c, cell in enumerate(row):
                if cell is not None and cell.units > 1 and len(grid.rows) <= 48:
                    ax.text(c, r, cell.text(), ha="center", va="center", fontsize=6)
        ax.set_xticks(np.arange(-0.5, len(grid.columns)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(grid.rows)), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    axes[0][0].set_ylabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
    bar.set_label("trained share (0 = frozen, 1 = trains)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def stats_metrics(selection: "Selection") -> dict[str, float]:
    """The selection's numbers as flat ``hft/...`` metrics, for TensorBoard or W&B.

        >>> from hft_plugin.testing import tiny_model
        >>> from hft_plugin import select_half
        >>> stats_metrics(select_half(tiny_model("llama")))["hft/trainable_ratio"]
        0.5
    """
    stats = selection.stats()
    metrics = {
        "hft/round": float(selection.config.round),
        "hft/ratio": float(selection.config.ratio),
        "hft/trainable_ratio": float(stats["trainable_ratio"]),
        "hft/overall_ratio": float(stats["overall_ratio"]),
        "hft/trainable_params": float(stats["trainable_params"]),
        "hft/total_params": float(stats["total_params"]),
    }
    for role, values in stats["roles"].items():
        metrics[f"hft/{role}_ratio"] = float(values["ratio"])
    return metrics


def train_start_summary(selection: "Selection", handle: "HFTHandle", *more: str) -> str:
    """The block every adapter logs when training starts: the selection's summary counting what
    actually trains once applied (tensors frozen by hand stay frozen; overall share first, as
    PEFT's ``trainable%``), how each partly trained tensor trains, then ``more`` lines.

        >>> from hft_plugin.testing import tiny_model
        >>> from hft_plugin import apply_selection, select_half
        >>> model = tiny_model("llama")
        >>> handle = apply_selection(model, select_half(model))
        >>> print(train_start_summary(handle.selection, handle).splitlines()[1])
        trainable params: 86,336 || all params: 160,320 || trainable%: 53.8523
    """
    from .checks import applied_counts

    lines = [selection.summary(applied_counts(selection, handle.model)), handle.mechanism_summary(), *more]
    return "\n".join(line for line in lines if line)
