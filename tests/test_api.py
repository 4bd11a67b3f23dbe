"""The Python API: the README's example runs as written, and the library leaves the process alone
(no offline guard or signal handler unless asked; the `appliance` command arms the guard itself)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import Appliance, offline
from appliance.cli import cli, main
from appliance.errors import ApplianceError

REPO = Path(__file__).resolve().parent.parent


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys, demo_model):
    for folder in ("prompts", "recipes", "tasks"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "reviews kept" in out and "intent accuracy" in out
    assert (tmp_path / "reviews.jsonl").stat().st_size > 0
    with Appliance("appliance.db") as app:
        kinds = [r["kind"] for r in app.runs()]
        assert sorted(kinds) == ["eval", "generate", "synthetic", "task"]
        assert all(r["status"] == "completed" for r in app.runs())
        # one model load per run, recorded in the run's events
        loads = app.store.rows("SELECT run_id, count(*) n FROM run_events WHERE message LIKE 'model % loaded in %' GROUP BY run_id")
        assert [r["n"] for r in loads] == [1, 1, 1, 1]


def test_calling_the_cli_in_process_leaves_socket_and_signals_alone(workdir):
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo
    handler = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli, ["--db", str(workdir / "a.db"), "db", "path"])
    assert result.exit_code == 0
    assert socket.socket.connect is connect and socket.getaddrinfo is getaddrinfo
    assert signal.getsignal(signal.SIGTERM) is handler


def test_the_console_entry_point_arms_the_guard(workdir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["appliance", "--db", str(workdir / "a.db"), "db", "path"])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 0
        assert socket.socket.connect is not offline._originals["connect"]
        with pytest.raises(ApplianceError, match="network access blocked"):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
    finally:
        offline.uninstall()
        signal.signal(signal.SIGTERM, handler)


def test_api_guard_only_when_asked_and_only_during_calls(workdir):
    connect = socket.socket.connect
    with Appliance(workdir / "a.db", offline=True) as app:
        with app._call():
            assert socket.socket.connect is not connect  # armed for the call
            with pytest.raises(ApplianceError, match="network access blocked"):
                socket.create_connection(("192.0.2.1", 80), timeout=1)
        assert socket.socket.connect is connect  # and disarmed after it
        assert app.runs() == []
    with Appliance(workdir / "b.db") as app:
        with app._call():
            assert socket.socket.connect is connect  # not asked: never armed


def test_api_errors_are_one_line_appliance_errors(workdir):
    with Appliance(workdir / "a.db") as app:
        with pytest.raises(ApplianceError, match="no such prompt file"):
            app.generate("nope.md", "gemma-3-270m-q4_k_m")
        with pytest.raises(ApplianceError, match="unknown model"):
            app.generate("prompts/product-review.md", "no-such-model")
