"""Runs on a Ray cluster: a real local cluster (`ray start --head`), two single-CPU actors, the demo model,
real SQLite; the driver is the real `appliance` process (its offline guard armed)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from appliance import offline
from appliance.workers.cluster import cluster_hosts
from appliance.errors import ApplianceError
from appliance.recipes.retry import ITEM_LIMIT

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Token authentication, as Ray 2.60 makes new clusters, with a token of the tests' own (not ~/.ray/auth_token);
# in this process's environment before Ray is imported, since Ray reads it then.
AUTH = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
os.environ.update(AUTH)
ENV = dict(os.environ)
ray = pytest.importorskip("ray", reason="the ray extra is not installed (scripts/install.sh installs it)")
CLIENT_PORT = 0  # the cluster's Ray Client server (ray://), set by the fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> str:
    """A one-node Ray cluster with 2 CPUs: what `ray start --head` makes on a lab machine."""
    global CLIENT_PORT
    port, CLIENT_PORT = _free_port(), _free_port()
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                        "--ray-client-server-port", str(CLIENT_PORT), "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, env=ENV, capture_output=True, timeout=120)
        address = f"{ray.util.get_node_ip_address()}:{port}"
        ray.init(address=address, namespace="appliance", logging_level="ERROR", log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def _copy(src: Path, dst: Path, **changes: str) -> Path:
    text = src.read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
    dst.write_text(text)
    return dst


def _start(db: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "appliance"), "--db", str(db), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _appliance(db: Path, *args: str, timeout: int = 900) -> tuple[int, str]:
    proc = _start(db, *args)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _rows(db: Path, sql: str, params: list | None = None) -> list[dict]:
    return list(sqlite_utils.Database(db).query(sql, params or []))


def _count(db: Path, run_id: int | None = None) -> int:
    try:
        where = f" WHERE run_id = {run_id}" if run_id else ""
        return _rows(db, f"SELECT count(*) AS n FROM generations{where}")[0]["n"] if db.exists() else 0
    except sqlite3.Error:
        return 0


def _firsts(db: Path, run_id: int) -> list[int]:
    """The item indexes of a run's first attempts (retries and fidelity checks have indexes past ITEM_LIMIT)."""
    return [r["item_index"] for r in _rows(db, "SELECT item_index FROM generations WHERE run_id = ? AND item_index < ?",
                                          [run_id, ITEM_LIMIT])]


def _no_duplicates(db: Path, run_id: int) -> None:
    keys = [r["item_key"] for r in _rows(db, "SELECT item_key FROM generations WHERE run_id = ?", [run_id])]
    indexes = [r["item_index"] for r in _rows(db, "SELECT item_index FROM generations WHERE run_id = ?", [run_id])]
    assert len(keys) == len(set(keys)) and len(indexes) == len(set(indexes))


def _events(db: Path, run_id: int) -> list[str]:
    return [r["message"] for r in _rows(db, "SELECT message FROM run_events WHERE run_id = ? ORDER BY id", [run_id])]


def _synthetic(tmp_path: Path, count: int, name: str) -> Path:
    for folder in ("recipes", "prompts"):
        shutil.copytree(REPO / folder, tmp_path / folder, dirs_exist_ok=True)
    return _copy(tmp_path / "recipes/synthetic-reviews.toml", tmp_path / f"recipes/{name}.toml", count=str(count),
                 name=f'"{name}"', max_tokens="24")


# ------------------------------------------------------------------------------ without a cluster


def test_addresses_and_the_offline_guard():
    assert cluster_hosts("local") == []
    assert cluster_hosts("10.0.0.5:6379") == ["10.0.0.5"]
    assert cluster_hosts("ray://head.lab:10001") == ["head.lab"]
    with pytest.raises(ApplianceError, match="give local, auto, HOST:PORT or ray://HOST:PORT"):
        cluster_hosts("somewhere")
    with offline.armed():
        offline.allow(["10.0.0.5"])
        try:
            assert offline._is_local(("10.0.0.5", 6379)) and offline._is_local(("127.0.0.1", 1))
            assert not offline._is_local(("10.0.0.6", 6379)) and not offline._is_local(("93.184.216.34", 443))
        finally:
            offline._allowed.clear()


def test_bad_ray_options_are_one_line_errors(tmp_path, demo_model):
    spec = _synthetic(tmp_path, 2, "bad")
    db = tmp_path / "a.db"
    code, err = _appliance(db, "run", str(spec), "--ray-actors", "2")
    assert code == 1 and err == "Error: --ray-actors needs --ray ADDRESS\n"
    code, err = _appliance(db, "run", str(spec), "--ray", "nowhere")
    assert code == 1 and err.startswith("Error: --ray 'nowhere': give local, auto") and err.count("\n") == 1
    assert _count(db) == 0


# ---------------------------------------------------------------------------------- on a cluster


@pytest.mark.slow
def test_synthetic_recipe_on_two_actors(cluster, tmp_path, demo_model):
    spec = _synthetic(tmp_path, 12, "ray-synthetic")
    db = tmp_path / "a.db"
    code, err = _appliance(db, "run", str(spec), "--quiet", "--ray", cluster, "--ray-actors", "2")
    assert code == 0, err
    run_id = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
    assert sorted(_firsts(db, run_id)) == list(range(12))  # exactly the items asked
    _no_duplicates(db, run_id)
    events = _events(db, run_id)
    loads = [e for e in events if e.startswith("model ") and " loaded on actor " in e]
    assert {re.search(r"on (actor \d)", e)[1] for e in loads} == {"actor 0", "actor 1"}, events
    assert all("threads 1" in e for e in loads)  # each single-CPU actor planned its own share
    assert len([e for e in events if re.match(r"actor \d on .*: \d+ outputs, \d+ tokens in .* tok/s\)$", e)]) >= 2
    assert _rows(db, "SELECT status FROM runs WHERE id = ?", [run_id])[0]["status"] == "completed"
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("appliance-")]


@pytest.mark.slow
def test_task_spec_on_two_actors(cluster, tmp_path, demo_model):
    for folder in ("tasks", "prompts"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    spec = _copy(tmp_path / "tasks/smart-home.toml", tmp_path / "tasks/ray-tasks.toml", count="12", name='"ray-tasks"')
    db = tmp_path / "a.db"
    code, err = _appliance(db, "run", str(spec), "--quiet", "--ray", cluster, "--ray-actors", "2")
    assert code == 0, err
    run_id = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
    _no_duplicates(db, run_id)
    assert "1 model load" not in err and re.search(r"2 model loads", err), err  # one load per actor, for every stage
    assert int(re.search(r"(\d+) of 12 examples kept", err)[1]) > 0
    assert _rows(db, "SELECT status FROM runs WHERE id = ?", [run_id])[0]["status"] == "completed"
    assert {r["split"] for r in _rows(db, "SELECT DISTINCT split FROM examples WHERE run_id = ?", [run_id])} >= {"train"}


@pytest.mark.slow
def test_an_actor_killed_mid_run_loses_and_repeats_nothing(cluster, tmp_path, demo_model):
    spec = _synthetic(tmp_path, 16, "ray-kill")
    db = tmp_path / "a.db"
    proc = _start(db, "run", str(spec), "--quiet", "--ray", cluster, "--ray-actors", "2")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _count(db) < 2:
        time.sleep(0.1)
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("appliance-")]
    assert proc.poll() is None and len(actors) == 2, "the run ended before an actor could be killed"
    ray.kill(ray.get_actor(sorted(a["name"] for a in actors)[0], namespace="appliance"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    run_id = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
    assert sorted(_firsts(db, run_id)) == list(range(16))
    _no_duplicates(db, run_id)
    assert any(re.match(r"Ray actor 0 on .* lost \(.*\); its \d+ unfinished items go to the other actors", e)
               for e in _events(db, run_id)), _events(db, run_id)


@pytest.mark.slow
def test_driver_killed_mid_run_then_the_same_command_resumes(cluster, tmp_path, demo_model):
    spec = _synthetic(tmp_path, 16, "ray-driver")
    db = tmp_path / "a.db"
    args = ["run", str(spec), "--quiet", "--ray", cluster, "--ray-actors", "2"]
    proc = _start(db, *args)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _count(db) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before the driver could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = _count(db)
    deadline = time.time() + 60  # the driver's actors die with it (Ray's ownership)
    while time.time() < deadline and [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("appliance-")]:
        time.sleep(0.5)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("appliance-")]
    code, err = _appliance(db, *args)
    assert code == 0, err
    run_id = int(re.search(r"^run (\d+) \(resumed\)", err, re.M)[1])
    assert 2 <= stored < 16 + 4  # some rows were stored before the kill, and are kept
    assert sorted(_firsts(db, run_id)) == list(range(16))
    _no_duplicates(db, run_id)


@pytest.mark.slow
def test_a_node_with_another_model_file_is_refused(cluster, tmp_path, demo_model):
    spec = _synthetic(tmp_path, 2, "ray-sha")
    db = tmp_path / "a.db"
    assert _appliance(db, "models", "list")[0] == 0  # registers the demo model and caches its sha256
    _appliance(db, "models", "info", "gemma-3-270m-q4_k_m")
    with sqlite3.connect(db) as conn:  # the registry now expects another file (same size and mtime)
        conn.execute("UPDATE models SET sha256 = ? WHERE name = 'gemma-3-270m-q4_k_m'", ["0" * 64])
    code, err = _appliance(db, "run", str(spec), "--quiet", "--ray", cluster)
    assert code == 1 and err.count("\n") == 1, err
    assert re.match(rf"Error: actor 0 on .* \([\d.]+\): {re.escape(str(demo_model))} has sha256 \w+\.\.\., "
                    r"the registry's is 000000000000\.\.\.: copy the registered file there$", err), err
    assert _count(db) == 0


@pytest.mark.slow
def test_ray_local_starts_and_stops_its_own_cluster(tmp_path, demo_model):
    spec = _synthetic(tmp_path, 4, "ray-local")
    db = tmp_path / "a.db"
    env = {k: v for k, v in ENV.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}  # as a user runs it
    proc = subprocess.run([str(BIN / "appliance"), "--db", str(db), "run", str(spec), "--quiet", "--ray", "local"],
                          capture_output=True, text=True, env=env, timeout=900)
    code, err = proc.returncode, proc.stderr
    assert code == 0, err
    run_id = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
    assert sorted(_firsts(db, run_id)) == list(range(4))


def _client_server_logs() -> str:
    """The end of each Ray Client server's error log (why a server the proxy started exited), for a failure message."""
    logs = sorted(Path("/tmp/ray/session_latest/logs").glob("ray_client_server*.err"))
    return "".join(f"\n--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]) for log in logs)


def test_a_ray_client_server_that_fails_to_start_is_tried_again(monkeypatch):
    """Ray Client's proxy starts a server process per client, which now and then exits as it starts: the
    connection is tried again as a new client (CLIENT_SERVER_ATTEMPTS in all), then the error is one line."""
    from appliance.workers import cluster as cluster_module

    failure = ConnectionAbortedError("Initialization failure from server:\nTraceback ...\nRuntimeError: Starting Ray client "
                                     "server failed. See ray_client_server_23000.err for detailed logs.")
    calls: list[str] = []

    def init(address: str, **options: object) -> None:
        calls.append(address)
        if len(calls) < failures:
            raise failure

    monkeypatch.setattr(cluster_module.time, "sleep", lambda s: None)
    for failures, connects in ((cluster_module.CLIENT_SERVER_ATTEMPTS, True), (cluster_module.CLIENT_SERVER_ATTEMPTS + 1, False)):
        calls.clear()
        c = cluster_module.Cluster("ray://127.0.0.1:10001")
        monkeypatch.setattr(c, "ray", type("FakeRay", (), {"init": staticmethod(init)}))
        if connects:
            assert c.__enter__() is c
        else:
            with pytest.raises(ApplianceError, match=r"^cannot connect to the Ray cluster at ray://127.0.0.1:10001: "
                                                     r"Initialization failure from server: RuntimeError: Starting Ray client server failed\."):
                c.__enter__()
        assert calls == ["ray://127.0.0.1:10001"] * cluster_module.CLIENT_SERVER_ATTEMPTS
    c = cluster_module.Cluster("127.0.0.1:6379")  # not Ray Client: no second try
    calls.clear()
    failures = 5
    monkeypatch.setattr(c, "ray", type("FakeRay", (), {"init": staticmethod(init)}))
    with pytest.raises(ApplianceError):
        c.__enter__()
    assert calls == ["127.0.0.1:6379"]


@pytest.mark.slow
def test_ray_client_address(cluster, tmp_path, demo_model):
    """ray://HOST:PORT joins through Ray Client, which cannot stream from actors: shards come back whole."""
    spec = _synthetic(tmp_path, 6, "ray-client")
    db = tmp_path / "a.db"
    code, err = _appliance(db, "run", str(spec), "--quiet", "--ray", f"ray://127.0.0.1:{CLIENT_PORT}", "--ray-actors", "2")
    assert code == 0, err + _client_server_logs()
    run_id = int(re.search(r"^run (\d+) \(new\)", err, re.M)[1])
    assert sorted(_firsts(db, run_id)) == list(range(6))
    _no_duplicates(db, run_id)
    assert len([e for e in _events(db, run_id) if " loaded on actor " in e]) == 2
