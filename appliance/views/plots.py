"""The plots of `appliance report`: matplotlib figures (Agg backend, no display) turned into inline <svg> elements.

Each `plot_*` function takes numbers the report already gathered and returns a figure; `figure_svg` turns
one into markup a self-contained page can carry (text drawn as paths, no URL, ids unique on the page).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

KEPT, DROPPED, TARGET, LINE = "#2b6ca3", "#d9822b", "#555555", "#b2182b"
SPLIT_COLORS = {"train": "#2b6ca3", "validation": "#7b3294", "test": "#1a9850", None: "#2b6ca3"}


@dataclass
class Plot:
    title: str
    svg: str
    caption: str


def _figure(height: float, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    for ax in axes if ncols > 1 else [axes]:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, axes


def _integer_counts(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Any, ax: Any, ncols: int = 4) -> None:
    """The legend above the plot, where it can never hide data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper right", ncols=ncols, fontsize="small", frameon=False)


_ID = re.compile(r'\bid="([^"]+)"')


def figure_svg(fig: Any, prefix: str) -> str:
    """The figure as an <svg> element for inlining: no XML prologue, metadata, comments or namespace
    URLs, and ids prefixed so several plots on one page never share one."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": prefix}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>|<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    ids = set(_ID.findall(text))
    text = re.sub(r'(\bid="|href="#|url\(#)([^")]+)', lambda m: m[1] + prefix + m[2] if m[2] in ids else m[0], text)
    return text.replace("<svg ", '<svg role="img" ', 1)


Panel = tuple[dict[str, dict[str | None, list[int]]], dict[str, list[int]]]


def plot_lengths(panels: dict[str, Panel], kept_label: str = "kept") -> Any:
    """One panel per measure (title -> (kept values per row and split, dropped values per row)), one row
    per label: each kept example a dot coloured by its split, dropped ones orange crosses."""
    import numpy as np

    names = sorted({n for groups, dropped in panels.values() for n in [*groups, *dropped]})
    fig, axes = _figure(1.3 + 0.38 * len(names), ncols=len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    rng = np.random.default_rng(0)
    for ax, (title, (groups, dropped)) in zip(axes, panels.items()):
        for y, name in enumerate(names):
            for split, values in sorted(groups.get(name, {}).items(), key=lambda kv: kv[0] or ""):
                ax.scatter(values, y + rng.uniform(-0.2, 0.2, len(values)), s=18, color=SPLIT_COLORS.get(split, KEPT),
                           alpha=0.8, label=split or kept_label, linewidths=0)
            if dropped.get(name):
                values = dropped[name]
                ax.scatter(values, y + rng.uniform(-0.2, 0.2, len(values)), s=18, marker="x", color=DROPPED, alpha=0.8,
                           label="dropped", linewidths=1)
            kept = [v for values in groups.get(name, {}).values() for v in values]
            if kept:
                ax.plot([np.median(kept)] * 2, [y - 0.32, y + 0.32], color="#333333", linewidth=1.2,
                        label=f"median of {kept_label}", zorder=0.9)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel(title)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [k for k in ("train", "validation", "test", kept_label, "dropped", f"median of {kept_label}") if k in handles]
    fig.legend([handles[k] for k in order], order, loc="outside upper right", ncols=6, fontsize="small", frameon=False)
    return fig


def plot_drops(rows: list[dict[str, Any]]) -> Any:
    fig, ax = _figure(1.0 + 0.4 * len(rows))
    names = [r["filter"] for r in rows]
    passed = [r["judged"] - r["dropped"] for r in rows]
    dropped = [r["dropped"] for r in rows]
    ax.barh(names, passed, color=KEPT, label="passed")
    ax.barh(names, dropped, left=passed, color=DROPPED, label="dropped")
    for y, (p, d) in enumerate(zip(passed, dropped)):
        if d:
            ax.text(p + d, y, f" {d}", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("generations judged by the filter")
    _legend(fig, ax)
    return fig


def plot_balance(targets: dict[tuple[str, str | None], int], kept: dict[tuple[str, str | None], int]) -> Any:
    """Kept examples as filled bars inside dashed outlines of their targets, with kept/target written out."""
    import numpy as np

    keys = list(targets)
    names = [f"{t}/{label}" if label else t for t, label in keys]
    fig, ax = _figure(1.2 + 0.36 * len(keys))
    y = np.arange(len(keys))
    have = [kept.get(k, 0) for k in keys]
    ax.barh(y, [targets[k] for k in keys], height=0.8, fill=False, edgecolor=TARGET, linestyle="--", label="target")
    ax.barh(y, have, height=0.55, color=KEPT, label="kept")
    for i, k in enumerate(keys):
        ax.text(max(have[i], targets[k]), i, f" {have[i]}/{targets[k]}", va="center", fontsize="small")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("examples")
    _legend(fig, ax)
    return fig


def plot_agreement(rows: list[dict[str, Any]], minimum: float) -> Any:
    """Bars per agreement value (k samples give k+1 possible values), kept on dropped."""
    values = sorted({round(r["confidence"], 3) for r in rows})
    kept = [sum(1 for r in rows if round(r["confidence"], 3) == v and r["kept"]) for v in values]
    dropped = [sum(1 for r in rows if round(r["confidence"], 3) == v and not r["kept"]) for v in values]
    fig, ax = _figure(2.6)
    width = min(0.08, 0.6 / max(1, len(values)))
    ax.bar(values, kept, width=width, color=KEPT, label="kept")
    ax.bar(values, dropped, width=width, bottom=kept, color=DROPPED, label="dropped")
    ax.axvline(minimum, color=LINE, linestyle="--", linewidth=1.2, label=f"minimum {minimum:.0%}")
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("share of the teacher's samples that agree with the label")
    ax.set_ylabel("inputs")
    _integer_counts(ax)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    _legend(fig, ax)
    return fig


def _hist(ax: Any, values: list[float], threshold: float, title: str, limit: str) -> None:
    import numpy as np

    finite = [v for v in values if np.isfinite(v)]
    top = max([*finite, threshold]) * 1.1 or 1.0
    shown = [v if np.isfinite(v) else top for v in values]  # an output without words: at the right edge
    ax.hist(shown, bins=12, range=(0, top), color=KEPT)
    _integer_counts(ax)
    ax.axvline(threshold, color=LINE, linestyle="--", linewidth=1.2)
    ax.set_title(f"{title}\n({limit} {threshold:g})", fontsize="small")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)


def plot_echo(metrics: list[dict[str, float]], filters: Any) -> Any:
    fig, axes = _figure(2.6, ncols=3)
    _hist(axes[0], [m["length_ratio"] for m in metrics], filters.echo_max_length_ratio, "instruction/output length", "fails at")
    _hist(axes[1], [m["ngram_overlap"] for m in metrics], filters.echo_max_ngram_overlap, "output 3-grams in instruction", "limit")
    _hist(axes[2], [m["longest_shared_run"] for m in metrics], filters.echo_max_shared_run, "longest copied run (words)", "limit")
    axes[0].set_ylabel("pairs")
    return fig


def plot_grounding(scores: list[float], minimum: float) -> Any:
    fig, ax = _figure(2.4)
    ax.hist(scores, bins=10, range=(0, 1), color=KEPT)
    _integer_counts(ax)
    ax.axvline(minimum, color=LINE, linestyle="--", linewidth=1.2, label=f"minimum {minimum:.0%}")
    ax.set_xlabel("share of the answer's content words found in its source chunk")
    ax.set_ylabel("answers")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    _legend(fig, ax)
    return fig


def plot_speed(points: list[tuple[float, float]]) -> Any:
    fig, ax = _figure(2.4)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=KEPT)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the run's first output")
    ax.set_ylabel("tokens/s")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    return fig


def plot_scores(series: dict[str, dict[str, float]], measure: str) -> Any:
    """Grouped bars: one group per label (or field), one bar per evaluation."""
    import numpy as np

    names = list(dict.fromkeys(k for scores in series.values() for k in scores))
    fig, ax = _figure(1.2 + 0.3 * len(names) * max(1, len(series)) ** 0.5)
    height = 0.8 / max(1, len(series))
    colors = ["#2b6ca3", "#d9822b", "#1a9850", "#7b3294", "#555555"]
    for i, (who, scores) in enumerate(series.items()):
        y = np.arange(len(names)) + i * height - 0.4 + height / 2
        values = [scores.get(n, 0.0) for n in names]
        ax.barh(y, values, height=height, color=colors[i % len(colors)], label=who)
        for yy, v in zip(y, values):
            ax.text(v, yy, f" {v:.2f}", va="center", fontsize="x-small")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1.08)
    ax.invert_yaxis()
    ax.set_xlabel(measure)
    _legend(fig, ax, ncols=2)
    return fig
