"""The CLI end to end on the real demo model and a real SQLite file, plus the bad-input catalogue."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils

REPO = Path(__file__).resolve().parent.parent


def counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    d = sqlite_utils.Database(db)
    return {t: d[t].count for t in ("models", "prompts", "runs", "generations") if t in d.table_names()}


def test_generate_logs_every_output(run_cli, demo_model):
    result = run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "4", "--seed", "7", "--max-tokens", "24")
    gens = run_cli.table("generations")
    assert len(gens) == 4
    runs = run_cli.table("runs")
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["requested"] == 4
    sha256 = run_cli.table("models")[0]["sha256"]
    assert len(sha256) == 64 and runs[0]["model_sha256"] == sha256
    plan = json.loads(runs[0]["plan_json"])
    assert plan["fits"] and plan["n_parallel"] >= 1
    params = json.loads(runs[0]["params_json"])
    assert params["seed"] == 7 and params["max_tokens"] == 24
    prompt = run_cli.table("prompts")[0]
    assert prompt["name"] == "product-review" and "Review:" in prompt["text"]
    for g in gens:
        assert g["rendered_prompt"].startswith("Customer reviews") and "{{" not in g["rendered_prompt"]
        assert g["finish_reason"] in {"stop", "eos", "length"}
        assert 0 < g["tokens_out"] <= 24 and g["tokens_in"] > 50
        assert g["output"].strip() in result.output
    assert len({g["seed"] for g in gens}) == 4


def test_same_seed_reproduces_the_outputs(run_cli, demo_model):
    args = ("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "3", "--seed", "11", "--max-tokens", "16", "--parallel", "1")
    run_cli(*args)
    run_cli(*args)
    gens = run_cli.table("generations")
    first = {g["item_index"]: (g["seed"], g["output"]) for g in gens if g["run_id"] == 1}
    second = {g["item_index"]: (g["seed"], g["output"]) for g in gens if g["run_id"] == 2}
    assert first == second


def test_json_output_and_schema_constraint(run_cli, demo_model):
    result = run_cli(
        "generate", "prompts/ticket-triage.md", "-m", str(demo_model), "-n", "3", "--seed", "3",
        "--json-schema", "prompts/schemas/ticket.json", "--json",
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    schema = json.loads(Path("prompts/schemas/ticket.json").read_text())
    for line in lines:
        data = json.loads(line["output"])
        assert data["category"] in schema["properties"]["category"]["enum"]
        assert data["urgency"] in schema["properties"]["urgency"]["enum"]
    assert json.loads(run_cli.table("runs")[0]["schema_json"]) == schema


def test_logs_search_and_runs(run_cli, demo_model):
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "2", "--seed", "5", "--max-tokens", "16", "--var", "product=a zebra-striped umbrella")
    out = run_cli("logs", "-n", "5", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all("zebra-striped umbrella" in r["rendered_prompt"] for r in rows)
    hits = run_cli("logs", "-q", "zebra-striped", "--json").stdout.splitlines()
    assert len(hits) == 2  # the full-text index covers rendered prompts as well as outputs
    assert run_cli("logs", "-q", "xylophonequartz", "--json").stdout == ""
    # the README's `sqlite-utils search` finds the same rows through sqlite-utils' own FTS detection
    assert len(list(sqlite_utils.Database(run_cli.db)["generations"].search("zebra"))) == 2
    assert "run    1  generate  completed" in run_cli("runs").stdout
    assert len(run_cli("logs", "--run", "1", "-n", "0", "--json").stdout.splitlines()) == 2


def test_models_add_list_inspect_remove(run_cli, demo_model, workdir):
    local = workdir / "tiny.gguf"
    os.link(demo_model, local) if os.stat(demo_model).st_dev == os.stat(workdir).st_dev else shutil.copy(demo_model, local)
    run_cli("models", "add", str(local), "--name", "tiny")
    listed = [json.loads(line) for line in run_cli("models", "list", "--json").stdout.splitlines()]
    names = {m["name"] for m in listed}
    assert "tiny" in names and "gemma-3-270m-q4_k_m" in names  # the demo package registers itself
    info = json.loads(run_cli("models", "inspect", "tiny", "--json").stdout)
    assert info["architecture"] == "gemma3" and info["file_type"] == "Q4_K_M"
    assert info["block_count"] == 18 and info["vocab_size"] == 262144 and len(info["sha256"]) == 64
    text = run_cli("models", "inspect", "tiny").stdout
    for field in ("parameters", "quantization", "trained context", "layers", "KV heads", "head size", "vocabulary", "sha256"):
        assert field in text
    run_cli("models", "remove", "tiny")
    assert "tiny" not in run_cli("models", "list").stdout
    assert local.exists()


def test_models_under_models_folder_are_found(run_cli, demo_model, workdir):
    (workdir / "models").mkdir()
    shutil.copy(demo_model, workdir / "models" / "found-me.gguf")
    assert "found-me" in run_cli("models", "list").stdout


def test_hw_and_plan(run_cli, demo_model):
    hw = json.loads(run_cli("hw", "--json").stdout)
    assert hw["cpu_threads"] >= 1 and hw["ram_total_bytes"] > 0
    plan = json.loads(run_cli("plan", str(demo_model), "--json").stdout)
    for key in ("fits", "weights_bytes", "kv_cache_bytes", "compute_bytes", "total_bytes", "available_bytes", "n_ctx", "n_parallel", "n_gpu_layers", "n_threads"):
        assert key in plan
    assert plan["fits"] is True and plan["n_gpu_layers"] == 0
    assert plan["total_bytes"] >= plan["weights_bytes"] + plan["kv_cache_bytes"]
    assert "verdict" in run_cli("plan", str(demo_model)).stdout


def test_db_check_and_backup(run_cli, demo_model, workdir):
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "2", "--max-tokens", "4")
    check = run_cli("db", "check").stdout
    assert "integrity    ok" in check and "generations  2 rows" in check and "run    1" in check
    run_cli("db", "backup", "copy.db")
    assert sqlite_utils.Database(workdir / "copy.db")["generations"].count == 2
    assert oct(os.stat(workdir / "copy.db").st_mode & 0o777) == "0o600"


def test_db_path(run_cli, workdir, monkeypatch):
    assert run_cli("db", "path").stdout.strip() == str(workdir / "appliance.db")
    monkeypatch.setenv("APPLIANCE_DB", str(workdir / "other.db"))
    from click.testing import CliRunner

    from appliance.cli import cli

    assert CliRunner().invoke(cli, ["db", "path"]).stdout.strip() == str(workdir / "other.db")


def test_generate_with_the_network_cut(run_cli, demo_model, monkeypatch):
    """Offline by construction: a whole generate with socket creation patched to raise."""

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "2", "--max-tokens", "8")
    assert len(run_cli.table("generations")) == 2


def test_offline_guard_blocks_and_names_the_caller():
    from appliance import offline
    from appliance.errors import ApplianceError

    offline.install()
    try:
        with pytest.raises(ApplianceError, match=r"network access blocked.*test_cli.py.*1\.1\.1\.1"):
            socket.create_connection(("1.1.1.1", 53), timeout=1)
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=1)  # loopback stays allowed
        client.close()
        server.close()
    finally:
        offline.uninstall()


def test_console_script_in_a_real_subprocess(workdir, demo_model):
    exe = Path(sys.executable).with_name("appliance")
    env = {**os.environ, "APPLIANCE_DB": str(workdir / "sub.db")}
    proc = subprocess.run(
        [str(exe), "generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "2", "--max-tokens", "12", "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "run 1 (completion mode): 2 outputs" in proc.stderr
    assert sqlite_utils.Database(workdir / "sub.db")["generations"].count == 2
    bad = subprocess.run([str(exe), "models", "inspect", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: unknown model 'nope'") and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------ bad input


def _make_bad_inputs(workdir: Path, demo_model: Path) -> dict[str, Path]:
    bad = workdir / "bad"
    bad.mkdir()
    (bad / "empty.gguf").write_bytes(b"")
    (bad / "notgguf.gguf").write_text("this is a text file, not a model\n")
    head = demo_model.read_bytes()[:4096]
    (bad / "trunc-header.gguf").write_bytes(head[:200])
    with demo_model.open("rb") as src, (bad / "trunc-data.gguf").open("wb") as dst:
        dst.write(src.read(demo_model.stat().st_size // 2))
    (bad / "syntax.md").write_text("Hello {{ name \n")
    (bad / "needsvar.md").write_text("Hello {{ who }}\n")
    (bad / "schema-notjson.json").write_text("{not json")
    (bad / "schema-bad.json").write_text('{"type": "object", "properties": {"a": {"type": "nonsense"}}}')
    (bad / "notsqlite.db").write_text("not a database at all\n")
    (bad / "recipe.toml").write_text('kind = "synthetic"\nmodel = "m"\nprompt = "p.md"\ncount = 2\ncolour = "red"\n')
    (bad / "spec.toml").write_text(
        'name = "s"\nmodel = "m"\ncount = 4\n[[tasks]]\nname = "t"\nkind = "classify"\nsystem = "x"\n'
        '[[tasks.labels]]\nname = "a"\ndescription = "a"\nexamples = ["a"]\n'
        '[[tasks.labels]]\nname = "a"\ndescription = "b"\nexamples = ["b"]\n'
    )
    review = REPO / "prompts" / "product-review.md"
    synthetic = f'kind = "synthetic"\nmodel = "{demo_model}"\nprompt = "{review}"\ncount = 2\n'
    (bad / "axis.toml").write_text(synthetic + '[axes]\nitem = ["a bicycle helmet"]\ntone = ["disappointed"]\n')
    (bad / "vars.toml").write_text(synthetic + '[vars]\nprodcut = "a desk lamp"\n')
    (bad / "fidelity.toml").write_text(synthetic + '[axes]\ntone = ["calm"]\n[filters]\nfidelity = ["mood"]\n')
    (bad / "emptyvars.md").write_text('+++\n[vars]\ntone = []\n+++\nA {{ tone }} review:\n')
    (bad / "sources").mkdir()
    (bad / "empty-sources.toml").write_text(
        f'kind = "annotated"\nmodel = "{demo_model}"\nprompt = "{REPO / "prompts" / "annotate-instruction.md"}"\nsources = ["sources"]\n'
    )
    return {p.name: p for p in bad.iterdir()}


BAD_CASES = [
    # (name, args, expected message fragment)
    ("model path missing", ["models", "add", "bad/nope.gguf"], "no such file"),
    ("model path is a directory", ["models", "add", "bad"], "directory"),
    ("model file empty", ["models", "add", "bad/empty.gguf"], "empty"),
    ("model file not GGUF", ["models", "inspect", "bad/notgguf.gguf"], "not a GGUF"),
    ("GGUF truncated in header", ["models", "add", "bad/trunc-header.gguf"], "truncated"),
    ("GGUF truncated in data", ["plan", "bad/trunc-data.gguf"], "truncated"),
    ("unknown model name", ["plan", "no-such-model"], "unknown model 'no-such-model'"),
    ("remove unknown model", ["models", "remove", "no-such-model"], "unknown model"),
    ("prompt missing", ["generate", "bad/missing.md", "-m", "DEMO"], "no such prompt file"),
    ("prompt is a directory", ["generate", "bad", "-m", "DEMO"], "directory"),
    ("prompt syntax error", ["generate", "bad/syntax.md", "-m", "DEMO"], "template error"),
    ("prompt variable not given", ["generate", "bad/needsvar.md", "-m", "DEMO"], "'who' not given"),
    ("bad --var", ["generate", "prompts/product-review.md", "-m", "DEMO", "--var", "oops"], "--var expects key=value"),
    ("misspelt --var", ["generate", "prompts/product-review.md", "-m", "DEMO", "--var", "prodcut=a desk lamp"],
     "--var 'prodcut' not used by prompt prompts/product-review.md (its variables: product, tone)"),
    ("empty list in [vars]", ["generate", "bad/emptyvars.md", "-m", "DEMO"], "variable 'tone' is an empty list"),
    ("recipe axis the prompt does not use", ["run", "bad/axis.toml"], "axis 'item' not used by prompt"),
    ("recipe [vars] the prompt does not use", ["run", "bad/vars.toml"], "[vars] 'prodcut' not used by prompt"),
    ("fidelity of an unknown axis", ["run", "bad/fidelity.toml"], "filters.fidelity names 'mood', not an axis (axes: tone)"),
    ("schema not JSON", ["generate", "prompts/ticket-triage.md", "-m", "DEMO", "--json-schema", "bad/schema-notjson.json"], "invalid JSON schema"),
    ("schema invalid", ["generate", "prompts/ticket-triage.md", "-m", "DEMO", "--json-schema", "bad/schema-bad.json"], "invalid JSON schema"),
    ("schema missing", ["generate", "prompts/ticket-triage.md", "-m", "DEMO", "--json-schema", "bad/none.json"], "no such JSON schema"),
    ("count zero", ["generate", "prompts/product-review.md", "-m", "DEMO", "-n", "0"], "at least 1"),
    ("count negative", ["generate", "prompts/product-review.md", "-m", "DEMO", "-n", "-3"], "at least 1"),
    ("plan does not fit", ["generate", "prompts/product-review.md", "-m", "DEMO", "--ctx", "32768", "ENV:APPLIANCE_MEMORY_LIMIT=200MiB"], "does not fit"),
    ("plan command does not fit", ["plan", "DEMO", "ENV:APPLIANCE_MEMORY_LIMIT=100MiB"], "does not fit"),
    ("db not sqlite", ["DB:bad/notsqlite.db", "models", "list"], "not a SQLite database"),
    ("db is a directory", ["DB:bad", "runs"], "directory"),
    ("logs of an unknown run", ["logs", "--run", "999"], "no run 999"),
    ("recipe with an unknown key", ["run", "bad/recipe.toml"], "key 'colour': unknown key"),
    ("recipe missing", ["run", "bad/none.toml"], "no such recipe file"),
    ("task spec with a duplicate label", ["run", "bad/spec.toml"], "duplicate label"),
    ("source folder without texts", ["run", "bad/empty-sources.toml"], "no .txt, .md or .jsonl files"),
    ("resume and new-run together", ["run", "bad/recipe.toml", "--resume", "1", "--new-run"], "exclude each other"),
    ("resume an unknown run", ["run", "--resume", "99", "bad/empty-sources.toml"], "no run 99 to resume"),
    ("export an unknown run", ["export", "99", "--out", "x.jsonl"], "no run 99"),
    ("export a bad split", ["export", "1", "--out", "x.jsonl", "--split", "train=0.9,test=0.2"], "add up to"),
    ("export into a missing folder", ["export", "1", "--out", "nowhere/x.jsonl"], "does not exist"),
    ("export a generate run", ["export", "1", "--out", "x.jsonl"], "is a generate run with no dataset examples"),
    ("eval of a generate run", ["eval", "DEMO", "--dataset", "1"], "eval needs a task run"),
    ("backup over an existing file", ["db", "backup", "bad/notsqlite.db"], "already exists"),
]


@pytest.mark.parametrize("name, args, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gives_one_line_and_keeps_rows(name, args, message, run_cli, workdir, demo_model, monkeypatch):
    files = _make_bad_inputs(workdir, demo_model)
    # a database with a finished run in it, which no bad input may change
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "1", "--max-tokens", "4")
    before = counts(run_cli.db)
    db = run_cli.db
    argv = []
    for a in args:
        if a.startswith("ENV:"):
            key, _, value = a[4:].partition("=")
            monkeypatch.setenv(key, value)
        elif a.startswith("DB:"):
            db = workdir / a[3:]
        else:
            argv.append(str(demo_model) if a == "DEMO" else a)
    from click.testing import CliRunner

    from appliance.cli import cli

    result = CliRunner().invoke(cli, ["--db", str(db), *argv])
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert counts(run_cli.db) == before
    if "notsqlite" in str(db):
        assert files["notsqlite.db"].read_text() == "not a database at all\n"
