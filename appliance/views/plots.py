"""The plots of `appliance report`: matplotlib figures (Agg backend, no display) turned into inline <svg> elements.

Each `plot_*` function takes numbers the report already gathered and returns a `Drawn`: the figure and the
numbers it draws as a table (what a screen reader reads, and anyone who wants the values). `figure_svg` turns
a figure into markup a self-contained page can carry (text drawn as paths, no URL, ids unique on the page).
Text is drawn at 12 pt, the page's body size when the plot is shown at 100%, which it is on a phone: its
box scrolls sideways rather than shrink it. Above `MARKERS` points a scatter draws a seeded random sample
of them, so a page's size is bounded whatever the run's; its table still counts every point.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

KEPT, DROPPED, TARGET, LINE = "#2b6ca3", "#d9822b", "#555555", "#b2182b"
SPLIT_COLORS = {"train": "#2b6ca3", "validation": "#7b3294", "test": "#1a9850", None: "#2b6ca3"}
WIDTH = 7.2  # inches: 691 px at 100%
TEXT_PT = 12  # 16 px: the page's body text
STYLE = {"font.size": TEXT_PT, "axes.titlesize": TEXT_PT, "axes.labelsize": TEXT_PT, "xtick.labelsize": TEXT_PT,
         "ytick.labelsize": TEXT_PT, "legend.fontsize": TEXT_PT, "figure.titlesize": TEXT_PT}
MARKERS = 2000  # most markers one scatter draws; above it, a seeded random sample
SEED = 0

Table = tuple[list[str], list[list[str]]]


@dataclass
class Drawn:
    """A figure, the numbers it draws (header, rows), and a note for the caption (e.g. that it sampled)."""

    fig: Any
    table: Table
    note: str = ""


@dataclass
class Plot:
    title: str
    svg: str
    caption: str
    table: Table = field(default_factory=lambda: ([], []))
    width_px: float = 0.0  # the drawn width, shown at 100% on any screen narrower than it


def _figure(height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(nrows, ncols)
    for ax in axes.flat if ncols * nrows > 1 else [axes]:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, axes


def styled(plot: Any) -> Any:
    """Run a `plot_*` function with the report's text size, so every label, tick and legend it makes is 12 pt."""
    import functools

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def fmt(value: float) -> str:
    """A number for a table: integers as integers, others with 3 significant digits."""
    import math

    if math.isnan(value):
        return "-"
    if abs(value - round(value)) < 1e-9:
        return f"{round(value):,}"
    return f"{value:.3g}"


def quantiles(values: list[float]) -> list[str]:
    """n, min, quartiles, median and max of some values, as table cells."""
    import numpy as np

    if not values:
        return ["0", "-", "-", "-", "-", "-"]
    q = np.quantile(np.asarray(values, dtype=float), [0, 0.25, 0.5, 0.75, 1])
    return [f"{len(values):,}", *(fmt(float(v)) for v in q)]


QUANTILE_HEADER = ["n", "min", "25%", "median", "75%", "max"]


def _integer_counts(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Any, ax: Any, ncols: int = 4) -> None:
    """The legend above the plot, where it can never hide data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper right", ncols=ncols, frameon=False)


_ID = re.compile(r'\bid="([^"]+)"')


def figure_svg(fig: Any, prefix: str) -> str:
    """The figure as an <svg> element for inlining: no XML prologue, metadata, comments or namespace
    URLs, and ids prefixed so several plots on one page never share one."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**STYLE, "svg.fonttype": "path", "svg.hashsalt": prefix}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>|<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    ids = set(_ID.findall(text))
    text = re.sub(r'(\bid="|href="#|url\(#)([^")]+)', lambda m: m[1] + prefix + m[2] if m[2] in ids else m[0], text)
    return text


def accessible(svg: str, label: str) -> str:
    """The <svg> as an image with a name: role="img", aria-label and a <title> saying what it shows."""
    import html

    name = html.escape(label, quote=True)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{name}" ', 1)
    return re.sub(r"(<svg\b[^>]*>)", lambda m: f"{m[1]}<title>{name}</title>", svg, count=1)


def drawn_width_px(svg: str) -> float:
    """The width matplotlib drew the figure at, in CSS px (its width attribute is in pt)."""
    match = re.search(r'<svg\b[^>]*\swidth="([\d.]+)pt"', svg)
    return float(match[1]) * 96 / 72 if match else 0.0


Panel = tuple[dict[str, dict[str | None, list[int]]], dict[str, list[int]]]


def _sample(groups: dict[tuple[Any, ...], list[int]], rng: Any) -> tuple[dict[tuple[Any, ...], list[int]], int]:
    """Every group's values when there are at most MARKERS in all; else a seeded random sample of about
    MARKERS, each group keeping its share (and at least one). Also the number of values in all."""
    total = sum(len(v) for v in groups.values())
    if total <= MARKERS:
        return groups, total
    out = {}
    for key, values in groups.items():
        k = max(1, round(len(values) * MARKERS / total)) if values else 0
        out[key] = [values[i] for i in sorted(rng.choice(len(values), size=min(k, len(values)), replace=False))]
    return out, total


@styled
def plot_lengths(panels: dict[str, Panel], kept_label: str = "kept", row_label: str = "label") -> Drawn:
    """One panel per measure (title -> (kept values per row and split, dropped values per row)), one row
    per label: each kept example a dot coloured by its split, dropped ones orange crosses. The table gives
    quantiles per measure, row and split (dropped as its own split)."""
    import numpy as np

    names = sorted({n for groups, dropped in panels.values() for n in [*groups, *dropped]})
    fig, axes = _figure(1.3 + 0.38 * len(names), ncols=len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    rng = np.random.default_rng(SEED)
    rows, shown, total = [], 0, 0
    for ax, (title, (groups, dropped)) in zip(axes, panels.items()):
        every = {(y, split): values for y, name in enumerate(names)
                 for split, values in sorted(groups.get(name, {}).items(), key=lambda kv: kv[0] or "")}
        every.update({(y, "\0dropped"): dropped[name] for y, name in enumerate(names) if dropped.get(name)})
        drawn, n = _sample(every, rng)
        total, shown = total + n, shown + sum(len(v) for v in drawn.values())
        for (y, split), values in drawn.items():
            jitter = y + rng.uniform(-0.2, 0.2, len(values))
            if split == "\0dropped":
                ax.scatter(values, jitter, s=18, marker="x", color=DROPPED, alpha=0.8, label="dropped", linewidths=1)
            else:
                ax.scatter(values, jitter, s=18, color=SPLIT_COLORS.get(split, KEPT), alpha=0.8, label=split or kept_label,
                           linewidths=0)
        for y, name in enumerate(names):
            kept = [v for values in groups.get(name, {}).values() for v in values]
            if kept:
                ax.plot([np.median(kept)] * 2, [y - 0.32, y + 0.32], color="#333333", linewidth=1.2,
                        label=f"median of {kept_label}", zorder=0.9)
            for (yy, split), values in every.items():
                if yy == y:
                    which = "dropped" if split == "\0dropped" else (split or kept_label)
                    rows.append([title.split()[0], name, which, *quantiles(values)])
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
    fig.legend([handles[k] for k in order], order, loc="outside upper right", ncols=3, frameon=False)
    note = (f"The marks are a random sample of {shown:,} of the {total:,} lengths (seed {SEED}, so the page is the same "
            "each time); the medians and the table count every one." if shown < total else "")
    unit = re.search(r"\((\w+)\)", next(iter(panels)))  # "input length (words)": words
    return Drawn(fig, ([f"{unit[1] if unit else 'length'} in", row_label, "split", *QUANTILE_HEADER], rows), note)


@styled
def plot_drops(rows: list[dict[str, Any]]) -> Drawn:
    fig, ax = _figure(1.0 + 0.4 * len(rows))
    names = [r["filter"] for r in rows]
    passed = [r["judged"] - r["dropped"] for r in rows]
    dropped = [r["dropped"] for r in rows]
    ax.barh(names, passed, color=KEPT, label="passed")
    ax.barh(names, dropped, left=passed, color=DROPPED, label="dropped")
    for y, (p, d) in enumerate(zip(passed, dropped)):
        if d:
            ax.text(p + d, y, f" {d}", va="center")
    ax.set_xlim(0, max([*(r["judged"] for r in rows), 1]) * 1.1)  # room for the counts written after the bars
    ax.invert_yaxis()
    ax.set_xlabel("generations judged by the filter")
    _legend(fig, ax)
    table = [[r["filter"], fmt(r["judged"]), fmt(r["judged"] - r["dropped"]), fmt(r["dropped"])] for r in rows]
    return Drawn(fig, (["filter", "judged", "passed", "dropped"], table))


@styled
def plot_balance(targets: dict[tuple[str, str | None], int], kept: dict[tuple[str, str | None], int]) -> Drawn:
    """Kept examples as filled bars inside dashed outlines of their targets, with kept/target written out."""
    import numpy as np

    keys = list(targets)
    names = [f"{t}/{label}" if label else t for t, label in keys]
    fig, ax = _figure(1.2 + 0.4 * len(keys))
    y = np.arange(len(keys))
    have = [kept.get(k, 0) for k in keys]
    ax.barh(y, [targets[k] for k in keys], height=0.8, fill=False, edgecolor=TARGET, linestyle="--", label="target")
    ax.barh(y, have, height=0.55, color=KEPT, label="kept")
    for i, k in enumerate(keys):
        ax.text(max(have[i], targets[k]), i, f" {have[i]}/{targets[k]}", va="center")
    ax.set_yticks(y, names)
    ax.set_xlim(0, max([*have, *targets.values(), 1]) * 1.18)  # room for kept/target written after the bars
    ax.invert_yaxis()
    ax.set_xlabel("examples")
    _legend(fig, ax)
    table = [[t, label or "-", fmt(kept.get((t, label), 0)), fmt(targets[(t, label)])] for t, label in keys]
    return Drawn(fig, (["task", "label", "kept", "target"], table))


@styled
def plot_agreement(rows: list[dict[str, Any]], minimum: float) -> Drawn:
    """Bars per agreement value (k samples give k+1 possible values), kept on dropped."""
    counts: dict[float, list[int]] = {}
    for r in rows:
        counts.setdefault(round(r["confidence"], 3), [0, 0])[0 if r["kept"] else 1] += 1
    values = sorted(counts)
    kept = [counts[v][0] for v in values]
    dropped = [counts[v][1] for v in values]
    fig, ax = _figure(2.8)
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
    table = [[f"{v:.0%}", fmt(k), fmt(d)] for v, k, d in zip(values, kept, dropped)]
    return Drawn(fig, ([f"agreement (minimum {minimum:.0%})", "kept", "dropped"], table))


def _hist(ax: Any, values: list[float], threshold: float, title: str, limit: str) -> list[list[str]]:
    """A 12-bin histogram with the threshold dashed; its bins as table rows (title, bin, count)."""
    import numpy as np

    finite = [v for v in values if np.isfinite(v)]
    top = max([*finite, threshold]) * 1.1 or 1.0
    shown = [v if np.isfinite(v) else top for v in values]  # an output without words: at the right edge
    counts, edges, _ = ax.hist(shown, bins=12, range=(0, top), color=KEPT)
    _integer_counts(ax)
    ax.axvline(threshold, color=LINE, linestyle="--", linewidth=1.2)
    ax.set_title(f"{title} ({limit} {threshold:g})")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    return [[f"{title} ({limit} {threshold:g})", f"{edges[i]:.3g} to {edges[i + 1]:.3g}", fmt(c)]
            for i, c in enumerate(counts)]


@styled
def plot_echo(metrics: list[dict[str, float]], filters: Any) -> Drawn:
    """The three echo measures side by side on wide screens; three panels stacked make each as wide as the page."""
    fig, axes = _figure(6.0, nrows=3)
    rows = _hist(axes[0], [m["length_ratio"] for m in metrics], filters.echo_max_length_ratio, "instruction/output length",
                 "fails at")
    rows += _hist(axes[1], [m["ngram_overlap"] for m in metrics], filters.echo_max_ngram_overlap,
                  "output 3-grams in instruction", "limit")
    rows += _hist(axes[2], [m["longest_shared_run"] for m in metrics], filters.echo_max_shared_run,
                  "longest copied run (words)", "limit")
    for ax in axes:
        ax.set_ylabel("pairs")
    return Drawn(fig, (["measure", "bin", "pairs"], rows))


@styled
def plot_grounding(scores: list[float], minimum: float) -> Drawn:
    fig, ax = _figure(2.6)
    counts, edges, _ = ax.hist(scores, bins=10, range=(0, 1), color=KEPT)
    _integer_counts(ax)
    ax.axvline(minimum, color=LINE, linestyle="--", linewidth=1.2, label=f"minimum {minimum:.0%}")
    ax.set_xlabel("share of the answer's content words found in its source chunk")
    ax.set_ylabel("answers")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    _legend(fig, ax)
    rows = [[f"{edges[i]:.0%} to {edges[i + 1]:.0%}", fmt(c)] for i, c in enumerate(counts)]
    return Drawn(fig, ([f"grounding score (minimum {minimum:.0%})", "answers"], rows))


@styled
def plot_judge(counts: dict[str, dict[int, tuple[int, int]]], threshold: float) -> Drawn:
    """One bar chart per criterion, stacked: outputs per score, split by whether the output's mean score
    reached the threshold (kept by the judge) or not."""
    names = list(counts)
    fig, axes = _figure(1.2 + 2.0 * len(names), nrows=len(names))
    axes = list(axes) if len(names) > 1 else [axes]
    rows = []
    for ax, name in zip(axes, names):
        scores = sorted(counts[name])
        passed = [counts[name][s][0] for s in scores]
        below = [counts[name][s][1] for s in scores]
        ax.bar(scores, passed, color=KEPT, label=f"mean score >= {threshold:g}")
        ax.bar(scores, below, bottom=passed, color=DROPPED, label=f"mean score < {threshold:g}")
        ax.set_xticks(scores, [str(s) for s in scores])
        ax.set_title(name)
        ax.set_ylabel("outputs")
        _integer_counts(ax)
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
        rows += [[name, str(s), fmt(p), fmt(b)] for s, p, b in zip(scores, passed, below)]
    axes[-1].set_xlabel("score")
    _legend(fig, axes[0])
    return Drawn(fig, (["criterion", "score", f"mean >= {threshold:g}", f"mean < {threshold:g}"], rows))


@styled
def plot_speed(points: list[tuple[float, float]]) -> Drawn:
    fig, ax = _figure(2.6)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=KEPT)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the run's first output")
    ax.set_ylabel("tokens/s")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    return Drawn(fig, (["seconds", "tokens/s"], [[f"{t:.3g}", f"{v:.1f}"] for t, v in points]))


@styled
def plot_scores(series: dict[str, dict[str, float]], measure: str) -> Drawn:
    """Grouped bars: one group per label (or field), one bar per evaluation."""
    import numpy as np

    names = list(dict.fromkeys(k for scores in series.values() for k in scores))
    fig, ax = _figure(1.2 + 0.36 * len(names) * max(1, len(series)) ** 0.5 + 0.3 * len(series))
    height = 0.8 / max(1, len(series))
    colors = ["#2b6ca3", "#d9822b", "#1a9850", "#7b3294", "#555555"]
    for i, (who, scores) in enumerate(series.items()):
        y = np.arange(len(names)) + i * height - 0.4 + height / 2
        values = [scores.get(n, 0.0) for n in names]
        ax.barh(y, values, height=height, color=colors[i % len(colors)], label=who)
        for yy, v in zip(y, values):
            ax.text(v, yy, f" {v:.2f}", va="center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1.12)
    ax.invert_yaxis()
    ax.set_xlabel(measure)
    _legend(fig, ax, ncols=1)
    header = ["label or field", *series]
    rows = [[n, *(f"{scores[n]:.2f}" if n in scores else "-" for scores in series.values())] for n in names]
    return Drawn(fig, (header, rows))
