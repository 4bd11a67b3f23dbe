"""See the data: `appliance report` pages rendered in a real headless Chromium, and `appliance browse`
(a real Datasette) checked over HTTP, both on one database holding a run of every kind made by the
demo model (a couple of minutes on 2 cores, shared by the module's tests)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from appliance.cli import cli
from appliance.store.database import Store

REPO = Path(__file__).resolve().parent.parent
# Flags for a browser that must not phone home: no sandbox (root in CI), no GPU, no QUIC, no first-run,
# background networking, component updates or sync.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = '<script>alert(1)</script><img src="https://example.com/pixel.png"> <a href="http://example.com/">x</a>'


def _invoke(db: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _copy(src: Path, dst: Path, **changes: str) -> Path:
    """A shipped recipe or spec with `key = value` lines replaced (smaller counts for tests)."""
    text = src.read_text()
    for key, value in changes.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    dst.write_text(text)
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_model) -> dict:
    """One database with a run of every kind, a run that kept nothing, and a run without outputs."""
    folder = tmp_path_factory.mktemp("seedata")
    for name in ("recipes", "tasks", "prompts"):
        shutil.copytree(REPO / name, folder / name)
    db = folder / "appliance.db"
    r, t = folder / "recipes", folder / "tasks"
    runs, printed = {}, {}
    for kind, path, changes in [
        ("synthetic", r / "synthetic-reviews.toml", {"count": "6"}),
        ("annotated", r / "annotated-coriolanus.toml", {"count": "4"}),
        ("augmented", r / "augmented-qa.toml", {"count": "4"}),
        ("task", t / "smart-home.toml", {"count": "12"}),
        ("nothing", r / "synthetic-reviews.toml", {"count": "2", "min_words": "500", "max_words": "1000", "name": '"nothing-kept"'}),
    ]:
        spec = _copy(path, path.with_name(f"{kind}-test.toml"), **changes)
        code, _, err = _invoke(db, "run", str(spec), "--quiet")
        assert code == (1 if kind == "nothing" else 0), err
        runs[kind] = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
        printed[kind] = err
    code, _, err = _invoke(db, "generate", str(folder / "prompts/product-review.md"), "-m", str(demo_model), "-n", "2",
                           "--max-tokens", "24", "--var", "product=a desk lamp")
    assert code == 0, err
    runs["generate"] = int(re.search(r"^run (\d+) \(\w+ mode\):", err, re.M)[1])
    code, out, err = _invoke(db, "eval", str(demo_model), "--dataset", str(runs["task"]), "--split", "train")
    assert code == 0, err
    runs["eval"] = int(re.search(r"\(run (\d+)\)", out)[1])
    store = Store(db)
    try:  # a run that failed before its first output, and one whose output is hostile markup
        runs["empty"] = store.start_run(kind="generate", requested=3)
        store.finish_run(runs["empty"], "failed", "the model file vanished")
        runs["hostile"] = store.start_run(kind="generate", requested=1, model_id=1)
        store.insert("generations", {"run_id": runs["hostile"], "item_key": "hostile", "item_index": 0, "rendered_prompt": "p",
                                     "output": HOSTILE, "seed": 1, "tokens_in": 1, "tokens_out": 30, "ms": 100,
                                     "finish_reason": "stop", "created_at": "2026-01-01T00:00:00.000+00:00"})
        store.finish_run(runs["hostile"], "completed")
    finally:
        store.close()
    return {"db": db, "folder": folder, "runs": runs, "printed": printed}


# ------------------------------------------------------------------------------------------ report


def _chromium() -> str | None:
    return os.environ.get("APPLIANCE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright, with a fresh profile; skipped (with the reason) where either is missing."""
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS[1:])
        yield b
        b.close()


def _render(browser, html: Path) -> dict:
    """Open the page in a fresh context; what it logged, requested and drew."""
    context = browser.new_context(viewport={"width": 900, "height": 1000})
    page = context.new_page()
    seen: dict = {"console": [], "errors": [], "requests": [], "dialogs": []}
    page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.goto(html.resolve().as_uri(), wait_until="load")
    seen["plots"] = page.eval_on_selector_all(
        "figure.plot", "els => els.map(f => { const s = f.querySelector('svg'); const r = s ? s.getBoundingClientRect() : null;"
        " return {title: f.querySelector('figcaption strong').textContent, width: r ? r.width : 0, height: r ? r.height : 0}; })")
    seen["samples"] = page.eval_on_selector_all("article.sample", "els => els.map(e => e.innerText)")
    seen["notice"] = page.text_content("#notice") if page.query_selector("#notice") else None
    seen["text"] = page.inner_text("body")
    context.close()
    return seen


PHONE = {"width": 390, "height": 844}
# Per plot: the width matplotlib drew it at (its <svg>'s width attribute, in pt) in CSS px, the width it is
# shown at, its accessible name, and its table; and how wide the page is against the viewport.
MEASURE = """() => ({page: document.documentElement.scrollWidth, body: document.body.scrollWidth, viewport: innerWidth,
  plots: [...document.querySelectorAll('figure.plot')].map(f => { const s = f.querySelector('svg');
    return {title: f.querySelector('figcaption strong').textContent, drawn: parseFloat(s.getAttribute('width')) * 96 / 72,
      shown: s.getBoundingClientRect().width, role: s.getAttribute('role'), name: s.getAttribute('aria-label'),
      svg_title: s.querySelector('title') ? s.querySelector('title').textContent : null,
      header: [...f.querySelectorAll('details table thead th')].map(c => c.textContent),
      rows: [...f.querySelectorAll('details table tbody tr')].map(r => [...r.cells].map(c => c.textContent))}; })})"""


def phone_view(browser, html: Path) -> dict:
    """The page in a fresh context at a phone's 390x844: MEASURE's numbers, and what it logged and requested."""
    context = browser.new_context(viewport=PHONE, device_scale_factor=3, is_mobile=True, has_touch=True)
    page = context.new_page()
    seen: dict = {"console": [], "requests": []}
    page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: seen["console"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(html.resolve().as_uri(), wait_until="load")
    seen.update(page.evaluate(MEASURE))
    context.close()
    return seen


def assert_readable_on_a_phone(seen: dict, html: Path) -> None:
    """Every plot at >= 90% of its drawn width, with a name and a table of its numbers; the page no wider
    than the phone; no console message and no request but the page."""
    assert seen["page"] <= PHONE["width"] and seen["body"] <= PHONE["width"], seen["page"]
    for p in seen["plots"]:
        assert p["drawn"] > 300 and p["shown"] >= 0.9 * p["drawn"], p
        assert p["role"] == "img" and p["name"].startswith(p["title"].rstrip(".")) and p["svg_title"] == p["name"], p
        assert p["header"] and p["rows"] and all(len(r) == len(p["header"]) for r in p["rows"]), p
    assert seen["console"] == [] and seen["requests"] == [html.resolve().as_uri()]


def _report(data: dict, key: str) -> tuple[Path, str]:
    out = data["folder"] / f"report-{key}.html"
    code, stdout, stderr = _invoke(data["db"], "report", str(data["runs"][key]), "--out", str(out))
    assert code == 0, stderr
    return out, stdout + stderr


EXPECTED_PLOTS = {
    "synthetic": ["Length of kept and dropped examples", "Drops per filter", "Tokens per second over the run"],
    "annotated": ["Length of kept and dropped examples", "Drops per filter", "Echo guard", "Tokens per second over the run"],
    "augmented": ["Length of kept and dropped examples", "Drops per filter", "Grounding scores", "Tokens per second over the run"],
    "task": ["Length per label and split", "Drops per filter", "Label balance against targets", "Teacher agreement",
             "SCORES", "Tokens per second over the run"],
    "generate": ["Output length per finish reason", "Tokens per second over the run"],
    "eval": ["Output length per finish reason", "SCORES", "Tokens per second over the run"],
}


def _expected_plots(data: dict, kind: str) -> list[str]:
    """The plots a report of `kind` must have; SCORES: one per task the evaluation scored."""
    metrics = json.loads(sqlite_utils.Database(data["db"]).execute("select metrics_json from evals").fetchone()[0])
    scores = [f"Student scores, {task}: " + ("F1 per label" if "labels" in m else "exact match per field")
              for task, m in sorted(metrics.items())]
    return [t for name in EXPECTED_PLOTS[kind] for t in (scores if name == "SCORES" else [name])]


@pytest.mark.parametrize("kind", list(EXPECTED_PLOTS))
def test_report_of_every_run_kind_renders_offline_in_chromium(data, browser, kind):
    out, printed = _report(data, kind)
    html = out.read_text()
    assert "<script" not in html and "Content-Security-Policy" in html
    assert not re.search(r'\s(src|href)="(?!#)', html)  # nothing to load: no src, no href but in-page references
    seen = _render(browser, out)
    assert seen["console"] == [] and seen["errors"] == []
    assert seen["requests"] == [out.resolve().as_uri()]  # the page itself, and nothing else
    expected = _expected_plots(data, kind)
    assert [p["title"] for p in seen["plots"]] == [f"{t}." for t in expected]
    assert all(p["width"] > 200 and p["height"] > 100 for p in seen["plots"]), seen["plots"]
    assert f"{len(expected)} plots" in printed
    assert seen["samples"], "every run with outputs shows some as text"
    if kind in ("synthetic", "annotated", "augmented", "task"):
        assert seen["notice"] is None or "kept nothing" not in seen["notice"]
        dropped = sqlite_utils.Database(data["db"]).execute(
            "select count(*) from examples where run_id = ? and kept = 0", [data["runs"][kind]]).fetchone()[0]
        if dropped:  # dropped examples are shown with their filters' reasons
            assert "Dropped examples, with the filters' reasons" in seen["text"]
    if kind == "eval":
        assert "Scores" in seen["text"] and ("Right predictions" in seen["text"] or "Wrong predictions" in seen["text"])


@pytest.mark.parametrize("kind", list(EXPECTED_PLOTS))
def test_report_on_a_phone_keeps_plot_sizes_and_gives_their_numbers_as_text(data, browser, kind):
    out, _ = _report(data, kind)
    seen = phone_view(browser, out)
    assert [p["title"] for p in seen["plots"]] == [f"{t}." for t in _expected_plots(data, kind)]
    assert_readable_on_a_phone(seen, out)
    plots = {p["title"]: p for p in seen["plots"]}
    d = sqlite_utils.Database(data["db"])
    if "Drops per filter." in plots:  # the table holds the numbers the bars draw
        drops = plots["Drops per filter."]
        assert drops["header"] == ["filter", "judged", "passed", "dropped"]
        dropped = d.execute("select count(*) from verdicts where run_id = ? and passed = 0", [data["runs"][kind]]).fetchone()[0]
        assert sum(int(r[3].replace(",", "")) for r in drops["rows"]) == dropped
    if kind == "task":
        balance = plots["Label balance against targets."]
        assert balance["header"] == ["task", "label", "kept", "target"]
        assert sum(int(r[3]) for r in balance["rows"]) == 12  # the spec's count, split over tasks and labels
        lengths = plots["Length per label and split."]
        assert lengths["header"][:3] == ["words in", "label", "split"] and "median" in lengths["header"]
        assert {r[0] for r in lengths["rows"]} == {"input", "output"}


def test_report_of_a_run_that_kept_nothing_says_why(data, browser):
    out, printed = _report(data, "nothing")
    seen = _render(browser, out)
    assert seen["notice"].startswith("This run kept nothing: dropped 2 by length")
    assert "kept nothing" in printed
    assert "Drops per filter." in [p["title"] for p in seen["plots"]]
    assert len(seen["samples"]) == 2 and all("length:" in s for s in seen["samples"])
    assert seen["console"] == [] and seen["requests"] == [out.resolve().as_uri()]


def test_report_of_a_run_without_outputs_and_of_hostile_output(data, browser):
    out, _ = _report(data, "empty")
    seen = _render(browser, out)
    assert seen["notice"] == "This run has no outputs: it is failed (the model file vanished)."
    assert seen["plots"] == [] and seen["samples"] == []
    out, _ = _report(data, "hostile")
    seen = _render(browser, out)
    assert HOSTILE in seen["samples"][0]  # shown as text, never run or loaded
    assert seen["dialogs"] == [] and seen["requests"] == [out.resolve().as_uri()] and seen["errors"] == []


def test_report_bad_inputs(data, tmp_path):
    code, _, err = _invoke(data["db"], "report", "999", "--out", str(tmp_path / "x.html"))
    assert code == 1 and err.startswith("Error: no run 999: give a run id, `last` or a run name") and err.count("\n") == 1
    code, _, err = _invoke(data["db"], "report", "1", "--out", str(tmp_path))
    assert code == 1 and err.startswith(f"Error: {tmp_path} is a folder")
    code, _, err = _invoke(data["db"], "report", "1", "--out", str(tmp_path / "missing" / "x.html"))
    assert code == 1 and "folder" in err and "does not exist" in err
    code, _, err = _invoke(tmp_path / "none.db", "report", "1", "--out", str(tmp_path / "x.html"))
    assert code == 1 and err.startswith("Error: no database at")
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "none.db").exists()


def test_runs_and_run_summary_point_to_report_and_browse(data):
    runs = data["runs"]
    # the printed command names the database (`appliance --db PATH report ...`) since issue 21
    assert f"report {runs['synthetic']} --out run-{runs['synthetic']}.html" in data["printed"]["synthetic"]
    assert re.search(r"appliance (--db \S+ )?browse", data["printed"]["task"])
    code, _, err = _invoke(data["db"], "runs")
    assert code == 0 and "report RUN_ID --out" in err and re.search(r"appliance (--db \S+ )?browse", err)


# ------------------------------------------------------------------------------------------ browse


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _json(url: str) -> list[dict]:
    status, body = _get(url)
    assert status == 200, body
    return json.loads(body)


def _content(db: Path) -> str:
    """A hash of everything stored (not of the file's bytes, which a WAL checkpoint may rewrite)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return hashlib.sha256("\n".join(conn.iterdump()).encode()).hexdigest()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(data):
    """`appliance browse --port 0` in a real subprocess (the CLI arms the offline guard), until SIGINT."""
    digest = _content(data["db"])
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "--db", str(data["db"]), "browse", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=data["folder"])
    line = proc.stderr.readline()
    match = re.search(r"read-only at (http://127\.0\.0\.1:\d+/)", line)
    assert match, line + proc.stderr.read()
    yield match[1] + data["db"].stem
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert "Traceback" not in proc.stderr.read()
    assert _content(data["db"]) == digest  # served read-only: nothing changed


def test_browse_pages_are_local_and_described(served):
    base = served.rsplit("/", 1)[0]
    status, index = _get(base + "/")
    assert status == 200 and "appliance" in index and "canned queries" in index
    status, database = _get(served)
    assert status == 200
    for title in ("Runs overview", "Drops per filter per run", "Label balance against targets (task runs)",
                  "Evaluations side by side", "Search outputs"):
        assert title in database
    for page in (index, database):  # every stylesheet and script comes from Datasette itself
        assets = re.findall(r'<(?:script[^>]*\ssrc|link[^>]*rel="stylesheet"[^>]*\shref)="([^"]+)"', page)
        assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    status, runs_page = _get(served + "/runs")
    assert status == 200 and "generate | synthetic | annotated | augmented | conversation | preference | task | eval" in runs_page
    assert 'class="facet-info' in runs_page or "facet-results" in runs_page


def test_browse_canned_queries_over_http(served, data):
    d = sqlite_utils.Database(data["db"])
    overview = _json(served + "/runs_overview.json?_shape=array")
    assert sorted(r["id"] for r in overview) == sorted(r["id"] for r in d["runs"].rows)
    task = next(r for r in overview if r["id"] == data["runs"]["task"])
    assert task["kept"] == d.execute("select count(*) from examples where run_id = ? and kept = 1", [task["id"]]).fetchone()[0]
    assert task["report"] == f"appliance report {task['id']} --out run-{task['id']}.html"
    drops = _json(served + "/drops_per_filter.json?_shape=array")
    assert sum(r["dropped"] for r in drops) == d.execute("select count(*) from verdicts where passed = 0").fetchone()[0]
    balance = _json(served + "/label_balance.json?_shape=array")
    assert {r["run_id"] for r in balance} == {data["runs"]["task"]}
    assert sum(r["target"] for r in balance) == 12  # the spec's count, split over tasks and labels
    assert {r["task"] for r in balance} == {"intent", "slots"}
    assert sum(r["kept"] for r in balance) == task["kept"]
    evaluations = _json(served + "/evaluations.json?_shape=array")
    assert {r["task"] for r in evaluations} == {"intent", "slots"} and all(r["student"] for r in evaluations)
    assert _json(served + "/per_label_scores.json?_shape=array")


def test_browse_full_text_search_over_http(served, data):
    output = sqlite_utils.Database(data["db"]).execute(
        "select output from generations where run_id = ? and output like '%lamp%' limit 1", [data["runs"]["generate"]]).fetchone()
    word = "lamp" if output else sqlite_utils.Database(data["db"]).execute(
        "select output from generations where length(output) > 20 limit 1").fetchone()[0].split()[0]
    rows = _json(served + f"/search_outputs.json?_shape=array&q={word}")
    assert rows and all("[" in r["snippet"] for r in rows)
    assert _json(served + "/search_outputs.json?_shape=array&q=") == []  # an empty search is no error
    assert _json(served + "/search_outputs.json?_shape=array&q=%22unbalanced") is not None  # stray quotes are escaped
    table = _json(served + f"/generations.json?_shape=array&_search={word}")
    assert {r["id"] for r in table} >= {r["id"] for r in rows}


def test_browse_refuses_a_busy_port_and_a_missing_database(data, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = _invoke(data["db"], "browse", "--port", str(port))
    assert code == 1 and err.startswith(f"Error: port {port} on 127.0.0.1 is already in use")
    code, _, err = _invoke(tmp_path / "none.db", "browse")
    assert code == 1 and err.startswith("Error: no database at") and not (tmp_path / "none.db").exists()
    (tmp_path / "text.db").write_text("not a database")
    code, _, err = _invoke(tmp_path / "text.db", "browse")
    assert code == 1 and "is not a SQLite database" in err
