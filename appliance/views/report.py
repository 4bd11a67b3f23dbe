"""`appliance report`: one run as one self-contained HTML page, plots as inline SVG, samples as text.

People read a dataset before training on it (DESIGN §5): what was kept and dropped and why, label
balance against targets, the echo and grounding measures against their thresholds, speed, and how
students scored. The page loads nothing: no script, no font, no external URL (matplotlib draws text
as paths, so every plot also carries its numbers as a table, and keeps its drawn size on a phone), and its Content-Security-Policy forbids any request, so not even a model output that
contains markup (it is escaped anyway) could make one. Every run kind gets a page; a run that kept
nothing gets one that says why. This module gathers a run's data and renders the page; the figures
are drawn in `appliance.plots`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from .plots import (
    Drawn,
    Panel,
    Plot,
    accessible,
    drawn_width_px,
    figure_svg,
    plot_agreement,
    plot_balance,
    plot_drops,
    plot_echo,
    plot_grounding,
    plot_judge,
    plot_lengths,
    plot_scores,
    plot_speed,
)
from ..runs.items import RECIPE_KINDS
from ..runs.queries import item_variables
from ..store import Store, command_prefix

TEMPLATE_FILE = Path(__file__).with_name("report.html.j2")
DATASET_KINDS = (*RECIPE_KINDS, "task")
SAMPLES = 6
NUMERIC = re.compile(r"-|[-\d.,%]+")  # a table cell aligned right
TEXT_LIMIT = 1200  # characters of one field shown in a sample (source passages can be long)


class ReportError(ApplianceError):
    """The report cannot be written as asked."""


def hint(run_id: int | str = "RUN_ID", prefix: str = "appliance") -> str:
    """The line `runs` and the end-of-run summary print, so people find both ways of looking; `prefix` is
    the command as typed for the database (`appliance.runs.queries.command_prefix`)."""
    return f"see the data: {prefix} report {run_id} --out run-{run_id}.html  |  {prefix} browse"


# ------------------------------------------------------------------------------------------ data


def spec_targets(config: dict[str, Any]) -> dict[tuple[str, str | None], int]:
    """The examples a task run's spec asks for, per (task, label) (label None for extract/transform
    tasks), from the spec stored in the run's config; {} for other runs."""
    if "spec" not in config:
        return {}
    from ..tasks.spec import label_targets, parse_task_spec, task_targets

    spec = parse_task_spec(config["spec"], "the run's stored spec")
    out: dict[tuple[str, str | None], int] = {}
    for task in spec.tasks:
        n = task_targets(spec)[task.name]
        if task.kind == "classify":
            out.update({(task.name, label): k for label, k in label_targets(task, n).items()})
        else:
            out[(task.name, None)] = n
    return out


def _recipe_filters(config: dict[str, Any]) -> Any:
    from ..recipes.recipe import Filters

    return Filters.model_validate((config.get("recipe") or {}).get("filters") or {})


def _time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _spread(rows: list[Any], k: int) -> list[Any]:
    """Up to k rows spread evenly over the list (the start, the middle and the end of a run)."""
    if len(rows) <= k:
        return list(rows)
    return [rows[i * len(rows) // k] for i in range(k)]


def _clip(text: str | None, limit: int = TEXT_LIMIT) -> str:
    text = (text or "").strip("\n")
    return text if len(text) <= limit else text[:limit].rstrip() + f" … ({len(text) - limit} more characters)"


def speed_points(gens: list[dict[str, Any]], buckets: int = 40) -> list[tuple[float, float]]:
    """(seconds since the run's first decode, tokens/s) at the middle of equal time buckets. Each output's
    tokens are spread evenly over the time it was decoded (`created_at - ms` to `created_at`), so outputs
    that finish together in one batch do not make a spike; loading a model and pauses between sessions
    show as zero."""
    spans = [(end - g["ms"] / 1000, end, g["tokens_out"]) for g in gens for end in [_time(g["created_at"])]]
    if not spans:
        return []
    start, end = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    width = max(end - start, 1e-3) / buckets
    totals = [0.0] * buckets
    for s, e, n in spans:
        if e - s <= 0:  # no decode time recorded: count it where it ended
            totals[min(buckets - 1, int((e - start) / width))] += n
            continue
        for b in range(max(0, int((s - start) / width)), min(buckets, int((e - start) / width) + 1)):
            lo, hi = start + b * width, start + (b + 1) * width
            totals[b] += n * max(0.0, min(e, hi) - max(s, lo)) / (e - s)
    return [((b + 0.5) * width, total / width) for b, total in enumerate(totals)]


# ---------------------------------------------------------------------------------------- report


@dataclass
class Sample:
    heading: str
    fields: list[tuple[str, str]]
    reasons: list[str] = field(default_factory=list)


@dataclass
class Report:
    run: dict[str, Any]
    facts: list[tuple[str, str]]
    notice: str | None
    events: list[str]
    plots: list[Plot]
    tables: list[tuple[str, list[str], list[list[str]]]]
    kept: list[Sample]
    dropped: list[Sample]
    kept_title: str = "Kept examples"
    dropped_title: str = "Dropped examples, with the filters' reasons"


class _Builder:
    def __init__(self, store: Store, run_id: int) -> None:
        runs = store.rows(
            "SELECT r.*, m.name AS model, p.name AS prompt FROM runs r LEFT JOIN models m ON m.id = r.model_id "
            "LEFT JOIN prompts p ON p.id = r.prompt_id WHERE r.id = ?", [run_id])
        if not runs:
            raise ReportError(f"no run {run_id} (see `{command_prefix(store.path)} runs`)")
        self.store, self.run_id, self.run = store, run_id, runs[0]
        self.config = json.loads(self.run["config_json"] or "{}")
        # every row of a run, but only the columns plots need: texts are read for the few samples shown
        self.gens = store.rows("SELECT id, item_index, tokens_out, ms, finish_reason, seed, created_at "
                               "FROM generations WHERE run_id = ? ORDER BY item_index", [run_id])
        self.examples = store.rows(
            "SELECT e.*, g.item_index FROM examples e JOIN generations g ON g.id = e.generation_id "
            "WHERE e.run_id = ? ORDER BY g.item_index, e.id", [run_id])
        self.failed: dict[int, list[dict[str, Any]]] = {}
        verdicts = "SELECT generation_id, filter, reason FROM verdicts WHERE run_id = ? AND passed = 0 ORDER BY id"
        for v in store.rows(verdicts, [run_id]):
            self.failed.setdefault(v["generation_id"], []).append(v)
        self.plots: list[Plot] = []
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []

    def add(self, title: str, drawn: Drawn, caption: str) -> None:
        svg = figure_svg(drawn.fig, f"p{len(self.plots)}-")
        name = f"{title}: a plot; its numbers are in the table after it"
        caption = f"{caption} {drawn.note}" if drawn.note else caption
        self.plots.append(Plot(title, accessible(svg, name), caption, drawn.table, drawn_width_px(svg)))

    # -- sections ----------------------------------------------------------------------------
    def lengths(self) -> None:
        from ..data.filters import words

        kind = self.run["kind"]
        if kind in DATASET_KINDS and self.examples:
            measures = {"output length (words)": "output"}
            if kind == "task":  # a label is one word: the inputs are where lengths vary
                measures = {"input length (words)": "instruction", **measures}
            panels: dict[str, Panel] = {}
            for title, column in measures.items():
                groups: dict[str, dict[str | None, list[int]]] = {}
                dropped: dict[str, list[int]] = {}
                for e in self.examples:
                    name = (f"{e['task']}/{e['label']}" if e["label"] else e["task"]) if e["task"] else "all"
                    n = len(words(e[column] or ""))
                    if e["kept"]:
                        groups.setdefault(name, {}).setdefault(e["split"], []).append(n)
                    else:
                        dropped.setdefault(name, []).append(n)
                panels[title] = (groups, dropped)
            what = "per label and split" if kind == "task" else "of kept and dropped examples"
            measured = "input and output (the label or JSON the teacher agreed on)" if kind == "task" else "output"
            self.add(f"Length {what}", plot_lengths(panels),
                     f"Words in each example's {measured}; dots are kept examples, coloured by split where the run assigned one; "
                     "crosses are dropped ones.")
        elif self.gens:
            groups = {}
            for g in self.gens:
                groups.setdefault(g["finish_reason"], {}).setdefault(None, []).append(g["tokens_out"])
            self.add("Output length per finish reason", plot_lengths({"output length (tokens)": (groups, {})}, kept_label="outputs",
                                                                      row_label="finish reason"),
                     "Tokens in each output; 'length' means it reached max_tokens and was cut.")

    def drops(self) -> None:
        rows = self.store.rows(
            "SELECT filter, count(*) judged, sum(passed = 0) dropped FROM verdicts WHERE run_id = ? GROUP BY filter "
            "ORDER BY dropped DESC, filter", [self.run_id])
        if rows:
            self.add("Drops per filter", plot_drops(rows),
                     "Each filter's verdicts: an example is kept only when all its filters pass. Some filters judge only "
                     "what earlier ones passed (duplicates, balance).")

    def balance(self) -> None:
        targets = spec_targets(self.config)
        if not targets:
            return
        kept: dict[tuple[str, str | None], int] = {}
        for e in self.examples:
            if e["kept"]:
                key = (e["task"], e["label"])
                kept[key] = kept.get(key, 0) + 1
        self.add("Label balance against targets", plot_balance(targets, kept),
                 "Kept examples per task and label (filled) inside the target the task spec asks for (dashed).")
        minimum = (self.config["spec"].get("self_consistency") or {}).get("min_agreement", 0.0)
        rows = [e for e in self.examples if e["confidence"] is not None]
        if rows:
            self.add("Teacher agreement", plot_agreement(rows, minimum),
                     "For each input, the share of the teacher's self-consistency samples that gave the majority answer; "
                     "inputs below the minimum are dropped.")

    def echo(self) -> None:
        from ..data.filters import echo_metrics

        pairs = [e for e in self.examples if e["instruction"]]
        if self.run["kind"] != "annotated" or not pairs:
            return
        metrics = [echo_metrics(e["instruction"], e["output"]).model_dump() for e in pairs]
        self.add("Echo guard", plot_echo(metrics, _recipe_filters(self.config)),
                 "Per instruction/output pair: how long the instruction is against the output, how much of the output "
                 "it repeats, and the longest verbatim run; dashed lines are the recipe's thresholds.")

    def grounding(self) -> None:
        if self.run["kind"] != "augmented":
            return
        scores = [r["score"] for r in self.store.rows(
            "SELECT score FROM verdicts WHERE run_id = ? AND filter = 'grounded' AND score IS NOT NULL", [self.run_id])]
        if scores:
            self.add("Grounding scores", plot_grounding(scores, _recipe_filters(self.config).grounding_min_score),
                     "Answers whose content words do not come from their source chunk are dropped.")

    def judge(self) -> None:
        from ..runs.summary import judge_stats

        stats = judge_stats(self.store, self.run_id)
        if stats is None:
            return
        counts: dict[str, dict[int, tuple[int, int]]] = {name: {s: (0, 0) for s in c} for name, c in stats.counts.items()}
        for r in self.store.rows("SELECT passed, detail_json FROM verdicts WHERE run_id = ? AND filter = 'judge' "
                                 "AND detail_json IS NOT NULL", [self.run_id]):
            for name, score in json.loads(r["detail_json"]).items():
                up, down = counts.setdefault(name, {}).get(score, (0, 0))
                counts[name][score] = (up + 1, down) if r["passed"] else (up, down + 1)
        means = ", ".join(f"{name} {stats.mean(name):.2f}" for name in stats.counts)
        self.add("Judge scores per criterion", plot_judge(counts, stats.threshold or 0.0),
                 f"The rubric judge's score of each output it scored ({stats.scored}), per criterion; outputs whose mean "
                 f"score is below {stats.threshold:g} are dropped. Mean per criterion: {means}.")

    def turns(self) -> None:
        if self.run["kind"] != "conversation":
            return
        from ..runs.summary import conversation_counts

        counts, _ = conversation_counts(self.store, self.run)  # the summary's turn counts, without the rest of it
        self.tables.append(("Turns per kept conversation", ["turns", "conversations"], [[str(k), str(n)] for k, n in counts.items()]))

    def speed(self) -> None:
        points = speed_points(self.gens)
        if points:
            total = sum(g["tokens_out"] for g in self.gens)
            self.add("Tokens per second over the run", plot_speed(points),
                     f"{total} tokens in {len(self.gens)} outputs; each output's tokens are spread over the time it was "
                     "decoded, summed over all sequences decoded together. Loading a model and pauses between sessions show as dips.")

    def evaluations(self) -> None:
        if self.run["kind"] == "eval":
            evals = self.store.rows("SELECT e.*, m.name student FROM evals e JOIN models m ON m.id = e.student_model_id "
                                    "WHERE e.run_id = ?", [self.run_id])
        elif self.run["kind"] == "task":
            evals = self.store.rows("SELECT e.*, m.name student FROM evals e JOIN models m ON m.id = e.student_model_id "
                                    "WHERE e.dataset_run_id = ? ORDER BY e.id", [self.run_id])
        else:
            return
        if not evals:
            return
        from ..tasks.evaluate import headline

        per_task: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        rows = []
        for ev in evals:
            metrics = json.loads(ev["metrics_json"] or "{}")
            who = f"eval {ev['id']}: {ev['student']} ({ev['split']}, n={ev['n']})"
            for task, m in sorted(metrics.items()):
                rows.append([str(ev["id"]), ev["student"], ev["split"], str(m.get("count", ev["n"])), task, headline(m)])
                if "labels" in m:
                    scored = set(m.get("macro_f1_labels", m["labels"]))  # a label with no test example and never predicted has no F1
                    per_task.setdefault(f"{task}: F1 per label", {})[who] = {k: v["f1"] for k, v in m["labels"].items() if k in scored}
                elif "fields" in m:
                    fields = {k: v["exact_match"] for k, v in m["fields"].items()}
                    per_task.setdefault(f"{task}: exact match per field", {})[who] = fields
        self.tables.append(("Evaluations" if self.run["kind"] == "task" else "Scores",
                            ["eval", "student", "split", "n", "task", "scores"], rows))
        for title, series in per_task.items():
            measure = "F1" if "F1" in title else "exact match"
            self.add(f"Student scores, {title}", plot_scores(series, measure),
                     "Scores of the student on the held-out split, per label (classify) or field (extract); "
                     "one bar per evaluation.")

    # -- text --------------------------------------------------------------------------------
    def _texts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows with their generation's output (as `raw_output`) and variables_json added."""
        key = "generation_id" if rows and "generation_id" in rows[0] else "id"
        ids = [r[key] for r in rows]
        found = {g["id"]: g for g in self.store.rows(
            f"SELECT id, output, variables_json FROM generations WHERE id IN ({','.join('?' * len(ids))})", ids)} if ids else {}
        return [{**r, "raw_output": found[r[key]]["output"], "variables_json": found[r[key]]["variables_json"]} for r in rows]

    def samples(self) -> tuple[list[Sample], list[Sample], str, str]:
        kind = self.run["kind"]
        if kind == "eval":
            return self._predictions()
        if kind not in DATASET_KINDS:
            outs = [Sample(", ".join([f"item {g['item_index']}", *_made_for(g), f"seed {g['seed']}", f"{g['tokens_out']} tokens",
                                      g["finish_reason"]]), [("output", _clip(g["raw_output"]))]) for g in self._texts(_spread(self.gens, SAMPLES))]
            return outs, [], "Sample outputs", ""
        kept = [self._example(e) for e in self._texts(_spread([e for e in self.examples if e["kept"]], SAMPLES))]
        by_filter: dict[str, list[dict[str, Any]]] = {}
        for e in self.examples:
            if not e["kept"]:
                first = (self.failed.get(e["generation_id"]) or [{"filter": "?"}])[0]["filter"]
                by_filter.setdefault(first, []).append(e)
        picked: list[dict[str, Any]] = []
        while len(picked) < SAMPLES and any(by_filter.values()):  # round robin: every filter's drops show
            for rows in by_filter.values():
                if rows and len(picked) < SAMPLES:
                    picked.append(rows.pop(0))
        dropped = [self._example(e) for e in self._texts(sorted(picked, key=lambda e: e["item_index"]))]
        return kept, dropped, "Kept examples", "Dropped examples, with the filters' reasons"

    def _example(self, e: dict[str, Any]) -> Sample:
        variables = json.loads(e["variables_json"] or "{}")
        # items are numbered as `logs` numbers them (item_index, from 0); a task example is its input's item
        bits = [f"item {variables.get('input_index', e['item_index'])}", *_made_for(e)]
        if e["task"]:
            bits.append(e["task"])
        if e["label"]:
            bits.append(f"label {e['label']}")
        if e["split"]:
            bits.append(e["split"])
        if e["confidence"] is not None:
            bits.append(f"agreement {e['confidence']:.0%}")
        fields = [("instruction" if self.run["kind"] != "task" else "input", _clip(e["instruction"]))]
        if e["input"]:
            fields.append(("input", _clip(e["input"])))
        fields.append(("output", _clip(e["output"])))
        if e.get("messages_json"):  # a conversation: every turn
            fields = [(f"{m['role']} {k // 2 + 1}", _clip(m["content"])) for k, m in enumerate(json.loads(e["messages_json"]))]
        rewritten = e["raw_output"].strip() != (e["output"] or "").strip()  # e.g. an answer parsed out of the output
        if not e["kept"] and self.run["kind"] in ("augmented", "synthetic") and rewritten:
            fields.append(("the model wrote", _clip(e["raw_output"])))
        reasons = [f"{v['filter']}: {v['reason']}" for v in self.failed.get(e["generation_id"], [])]
        return Sample(", ".join(bits), fields, reasons)

    def _predictions(self) -> tuple[list[Sample], list[Sample], str, str]:
        rows = self.store.rows(
            "SELECT p.*, x.instruction FROM predictions p JOIN evals e ON e.id = p.eval_id JOIN examples x ON x.id = p.example_id "
            "WHERE e.run_id = ? ORDER BY p.id", [self.run_id])

        def sample(p: dict[str, Any]) -> Sample:
            state = "right" if p["correct"] else ("wrong" if p["valid"] else "invalid output")
            return Sample(f"example {p['example_id']}, {p['task']}, {state}",
                          [("input", _clip(p["instruction"])), ("expected", _clip(p["expected"])),
                           ("predicted", _clip(p["predicted"]))])

        right = [sample(p) for p in _spread([p for p in rows if p["correct"]], SAMPLES)]
        wrong = [sample(p) for p in _spread([p for p in rows if not p["correct"]], SAMPLES)]
        return right, wrong, "Right predictions", "Wrong predictions"

    # -- the whole -----------------------------------------------------------------------------
    def facts(self) -> list[tuple[str, str]]:
        r = self.run
        kept = sum(1 for e in self.examples if e["kept"])
        out = [("kind", r["kind"]), ("status", r["status"]), ("model", r["model"] or "-")]
        if r["prompt"]:
            out.append(("prompt", r["prompt"]))
        source = self.config.get("recipe_path") or self.config.get("spec_path")
        if source:
            out.append(("made from", str(source)))
        if r["kind"] == "eval":
            out.append(("dataset", f"run {self.config.get('dataset_run')}, split {self.config.get('split')}"))
        unit = "examples" if r["kind"] == "task" else "items"
        out.append(("outputs", f"{len(self.gens)} generated ({r['requested']} {unit} requested)"))
        if r["kind"] in DATASET_KINDS:
            out.append(("examples", f"{kept} kept, {len(self.examples) - kept} dropped"))
        out.append(("tokens out", str(sum(g["tokens_out"] for g in self.gens))))
        out.append(("started", r["started_at"]))
        if r["ended_at"]:
            out.append(("ended", f"{r['ended_at']} ({_time(r['ended_at']) - _time(r['started_at']):.0f} s)"))
        return out

    def notice(self) -> str | None:
        r = self.run
        error = f" ({r['error']})" if r["error"] else ""
        if not self.gens:
            return f"This run has no outputs: it is {r['status']}{error}."
        if r["kind"] in DATASET_KINDS and not any(e["kept"] for e in self.examples):
            from ..runs.summary import summarize

            why = summarize(self.store, self.run_id).why_nothing() or "kept nothing: no example has been judged yet"
            return f"This run {why}."
        if r["status"] != "completed":
            return f"This run is {r['status']}{error}: the page shows what it stored so far."
        return None

    def build(self) -> Report:
        for section in (self.lengths, self.drops, self.judge, self.balance, self.echo, self.grounding, self.turns, self.evaluations,
                        self.speed):
            section()
        kept, dropped, kept_title, dropped_title = self.samples()
        events = [f"{e['level']}: {e['message']}" for e in self.store.rows(
            "SELECT level, message FROM run_events WHERE run_id = ? ORDER BY id", [self.run_id])]
        return Report(self.run, self.facts(), self.notice(), events, self.plots, self.tables, kept, dropped,
                      kept_title, dropped_title)


def build_report(store: Store, run_id: int) -> Report:
    return _Builder(store, run_id).build()


def render(report: Report) -> str:
    import jinja2
    import markupsafe

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.tests["numeric_cell"] = lambda cell: bool(NUMERIC.fullmatch(cell))
    template = env.from_string(TEMPLATE_FILE.read_text(encoding="utf-8"))
    return template.render(r=report, svg=lambda p: markupsafe.Markup(p.svg))


def _made_for(row: dict[str, Any]) -> list[str]:
    """`for tone=..., product=...`: the values an output was asked for, when it has any."""
    made_for = item_variables(json.loads(row.get("variables_json") or "null"))
    return [f"for {made_for}"] if made_for else []


def write_report(store: Store, run_id: int, out: Path) -> Report:
    """Write run `run_id`'s report to `out` (one HTML file) and return what it holds."""
    if out.is_dir():
        raise ReportError(f"{out} is a folder; give a file name, e.g. --out run-{run_id}.html")
    if not out.parent.is_dir():
        raise ReportError(f"cannot write {out}: folder {out.parent} does not exist")
    report = build_report(store, run_id)
    try:
        out.write_text(render(report), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror}") from None
    return report
