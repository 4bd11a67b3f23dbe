"""A run's generation spread over a Ray cluster; the driver (this process) stays the single writer.

`appliance run FILE --ray ADDRESS` connects (`local` starts Ray on this machine, loopback only;
`auto`, `HOST:PORT` or `ray://HOST:PORT` joins a running cluster) and gives the run's `RunSession`
a `RayWorkers` in place of its in-process `ModelWorker`:

- one actor per node, or per GPU on nodes with GPUs (`--ray-actors N`: N actors, spread over the
  nodes); each holds a `ModelWorker` that plans against its own node's free RAM/VRAM (its share of
  it) and CPUs, and loads the model from the registry's path on that node after checking the file's
  sha256 against the registry;
- a stage's requests go out in shards; every actor streams its notices back (`appliance.worker`),
  and the session writes each completion through its one writer thread, keyed by item as always;
- an actor or node lost mid-shard: its unfinished requests go back to the queue for the others;
  a driver killed mid-run: the same command continues the run (the rows it stored are kept).

Ray is an optional extra (`pip install 'appliance[ray]'`). Usage statistics and the dashboard are
off; the offline guard allows the cluster's address given on the command line and loopback only.
"""

from __future__ import annotations

import math
import os
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .. import offline
from ..errors import ApplianceError, first_line
from ..engine.types import Request, SamplingParams
from ..models.registry import ModelRecord, sha256_file
from ..plan.planner import Plan
from .local import Limits, ModelWorker, Needs, Notice

NAMESPACE = "appliance"
NOTICES_EVERY_S = 0.25  # an actor sends what happened (rows, tokens) at most this often
# Ray Client (ray://): the cluster's proxy starts a server process per client, and now and then that process
# exits as it starts ("Starting Ray client server failed"; Ray's own client tests are flaky on it). The
# connection is tried again, as a new client, up to this many times in all before the error is shown.
CLIENT_SERVER_ATTEMPTS = 3
CLIENT_SERVER_FAILED = "Starting Ray client server failed"


def _ray() -> Any:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before the import: Ray reads it then
    try:
        import ray
    except ImportError:
        raise ApplianceError("--ray needs Ray: pip install 'appliance[ray]' (scripts/install.sh adds it)") from None
    return ray


def cluster_hosts(address: str) -> list[str]:
    """The hosts an address names (what the offline guard must allow), `auto` resolved as Ray does."""
    if address == "local":
        return []
    if address == "auto":
        address = _auto_address()
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or parsed.port is None and "://" not in address:
        raise ApplianceError(f"--ray {address!r}: give local, auto, HOST:PORT or ray://HOST:PORT")
    return [parsed.hostname]


def _auto_address() -> str:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die("auto")
    except (ImportError, ConnectionError, ValueError) as exc:
        raise ApplianceError(f"--ray auto: no running Ray cluster found on this machine ({exc}); start one with `ray start --head`") from None


class Cluster:
    """A connection to a Ray cluster for the length of one command (`with Cluster(address) as c`)."""

    def __init__(self, address: str, *, actors: int | None = None) -> None:
        if actors is not None and actors < 1:
            raise ApplianceError(f"--ray-actors must be at least 1, got {actors}")
        self.address, self.actors = address, actors
        self.client = address.startswith("ray://")  # Ray Client: no streaming from actors
        self.hosts = cluster_hosts(address)
        if address == "local" and "RAY_AUTH_MODE" not in os.environ:
            # Ray binds this machine's address (it refuses loopback), so only holders of this command's own
            # token may talk to the cluster it starts; set before Ray is imported (it reads them then), and
            # kept in the environment rather than written to ~/.ray/auth_token.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        if address == "local":  # Ray starts workers at nice 15: the model would yield its cores to anything else
            os.environ.setdefault("RAY_worker_niceness", "0")
        self.ray = _ray()

    def __enter__(self) -> Cluster:
        ray = self.ray
        offline.allow(self.hosts)
        options: dict[str, Any] = {"namespace": NAMESPACE, "include_dashboard": False, "log_to_driver": False,
                                   "logging_level": "ERROR", "configure_logging": True}
        if self.address != "local":
            options.pop("include_dashboard")
        for attempt in range(1, CLIENT_SERVER_ATTEMPTS + 1):
            try:
                if self.address == "local":
                    ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
                else:
                    ray.init(address=self.address, **options)
                return self
            except (ConnectionError, RuntimeError, ValueError) as exc:
                if not (self.client and CLIENT_SERVER_FAILED in str(exc) and attempt < CLIENT_SERVER_ATTEMPTS):
                    raise ApplianceError(f"cannot connect to the Ray cluster at {self.address}: {first_line(exc)}") from None
                time.sleep(attempt)  # a fresh client id on the next try: the proxy starts a new server for it
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.ray.shutdown()

    def workers(self, record: ModelRecord, limits: Limits) -> RayWorkers:
        return RayWorkers(self, record, limits)

    def placements(self) -> list[dict[str, Any]]:
        """Where the actors go: one per node (per GPU on GPU nodes), or `actors` spread over the nodes;
        each with its share of its node's CPUs, GPUs and memory."""
        nodes = sorted((n for n in self.ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
        if not nodes:
            raise ApplianceError(f"the Ray cluster at {self.address} has no live nodes")
        if self.actors is None:
            per_node = [max(1, int(n["Resources"].get("GPU", 0))) for n in nodes]
        else:
            per_node = [self.actors // len(nodes) + (i < self.actors % len(nodes)) for i in range(len(nodes))]
        out = []
        for node, k in zip(nodes, per_node):
            cpus, gpus = node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0)
            for _ in range(k):
                out.append({"node_id": node["NodeID"], "ip": node.get("NodeManagerAddress", "?"),
                            "num_cpus": math.floor(cpus / k) if cpus >= k else cpus / k,
                            "num_gpus": (1 if gpus >= k else gpus / k) if gpus else 0, "share": 1 / k})
        return out


class NodeActor:
    """What runs in each Ray actor: the node's check of the model file, and a `ModelWorker`."""

    def __init__(self, path: str, sha256: str, info: Any, limits: Limits, hosts: list[str], label: str) -> None:
        offline.install()
        offline.allow(hosts)
        self.path, self.sha256, self.info, self.limits, self.label = path, sha256, info, limits, label
        self.worker: ModelWorker | None = None

    def check(self) -> str:
        """The model file on this node is the registry's (by sha256); where this actor runs."""
        import ray

        where = f"{self.label} on {socket.gethostname()} ({ray.util.get_node_ip_address()})"
        if not os.path.isfile(self.path):
            raise ApplianceError(f"{where}: no model file at {self.path} (every node needs the model at the registry's path)")
        digest = sha256_file(Path(self.path))
        if digest != self.sha256:
            raise ApplianceError(f"{where}: {self.path} has sha256 {digest[:12]}..., the registry's is {self.sha256[:12]}...: "
                                 f"copy the registered file there")
        _unniced()
        gpu_ids = tuple(int(g) for g in ray.get_gpu_ids())
        limits = replace(self.limits, gpu_ids=gpu_ids) if gpu_ids else self.limits
        self.worker = ModelWorker(self.path, self.info, limits, where=where)
        return where

    def prepare(self, needs: Needs) -> Plan:
        assert self.worker is not None
        return self.worker.prepare(needs)

    def stream(self, requests: list[Request], params: SamplingParams) -> Iterator[list[Notice]]:
        """The worker's notices in batches, one every NOTICES_EVERY_S at most (each yield is a Ray object:
        one per completion would cost the driver and the actor CPU the model needs)."""
        assert self.worker is not None
        batch: list[Notice] = []
        tokens, last = 0, time.monotonic()
        for kind, payload in self.worker.stream(requests, params):
            if kind == "tokens":
                tokens += payload
            else:
                batch.append((kind, payload))
            if time.monotonic() - last >= NOTICES_EVERY_S:
                yield batch + ([("tokens", tokens)] if tokens else [])
                batch, tokens, last = [], 0, time.monotonic()
        if batch or tokens:
            yield batch + ([("tokens", tokens)] if tokens else [])

    def collect(self, requests: list[Request], params: SamplingParams) -> list[Notice]:
        """The whole shard's notices at once: Ray Client (ray://) cannot stream from an actor."""
        return [notice for batch in self.stream(requests, params) for notice in batch]


def _unniced() -> None:
    """This actor's thread (and the llama.cpp threads it starts later) at normal priority: a cluster's
    raylet starts workers at nice 15 unless RAY_worker_niceness says otherwise; raising priority
    needs CAP_SYS_NICE, so where it is refused the actor runs as started."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Actor:
    handle: Any
    where: str = ""
    plan: Plan | None = None
    alive: bool = True
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Stage:
    """One stage's shards and the actors serving them (shared by the driver's threads)."""

    work: deque[list[Request]]
    out: queue.Queue = field(default_factory=queue.Queue)
    busy: int = 0
    stop: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


class RayWorkers:
    """The `RunSession` workers of a cluster: actors started on the first `prepare`, killed on `close`."""

    def __init__(self, cluster: Cluster, record: ModelRecord, limits: Limits) -> None:
        if not record.sha256:
            raise ApplianceError(f"model {record.name} has no sha256 in the registry; it is needed to check the nodes' copies")
        self.cluster, self.record, self.limits = cluster, record, limits
        self.actors: list[_Actor] = []
        self.loads = 0
        self.load_seconds = 0.0

    def _start(self) -> None:
        if self.actors:
            return
        ray = self.cluster.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(NodeActor)
        run_tag = os.urandom(4).hex()
        for i, place in enumerate(self.cluster.placements()):
            limits = replace(self.limits, memory_share=place["share"],
                             n_threads=self.limits.n_threads or max(1, int(place["num_cpus"])))
            handle = remote.options(
                name=f"appliance-{run_tag}-{i}", num_cpus=place["num_cpus"], num_gpus=place["num_gpus"],
                max_restarts=0, max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(place["node_id"], soft=False),
            ).remote(self.record.path, self.record.sha256, self.record.info, limits, self.cluster.hosts, f"actor {i}")
            self.actors.append(_Actor(handle))
        wheres = self._get([a.handle.check.remote() for a in self.actors], "starting")
        for actor, where in zip(self.actors, wheres):
            actor.where = where

    def _get(self, refs: list[Any], doing: str) -> list[Any]:
        ray = self.cluster.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        except ray.exceptions.RayError as exc:
            raise ApplianceError(f"a Ray actor failed while {doing}: {first_line(exc)}") from None

    def prepare(self, needs: Needs) -> Plan:
        """Every actor plans against its own node; the first plan describes the run (all are in its events)."""
        self._start()
        plans = self._get([a.handle.prepare.remote(needs) for a in self.actors], "planning")
        for actor, plan in zip(self.actors, plans):
            actor.plan = plan
        return plans[0]

    def stream(self, requests: list[Request], params: SamplingParams) -> Iterator[Notice]:
        """Shards of `requests` to the live actors, their notices merged as they come; an actor lost
        mid-shard has its unfinished requests re-sent to the others."""
        live = [a for a in self.actors if a.alive]
        if not live:
            raise ApplianceError("every Ray actor of this run was lost; run the same command again to continue")
        parallel = min(a.plan.n_parallel if a.plan else 1 for a in live)
        # Shards: each at least a full batch (the plan's parallel) and about a quarter of an actor's share, so
        # a lost actor costs little and a fast one takes more; never more than an even split, so all get work.
        size = min(math.ceil(len(requests) / len(live)), max(parallel, math.ceil(len(requests) / (4 * len(live)))))
        stage = _Stage(deque(requests[i:i + size] for i in range(0, len(requests), size)))
        threads = [threading.Thread(target=self._serve, args=(a, stage, params), daemon=True) for a in live]
        for t in threads:
            t.start()
        before = {id(a): (a.rows, a.tokens, a.seconds) for a in live}
        finished = 0
        try:
            while finished < len(threads):
                try:
                    actor, kind, payload = stage.out.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "end":
                    finished += 1
                elif kind == "lost":
                    yield "warning", (f"Ray {actor.where} lost ({payload[0]}); its {payload[1]} unfinished items "
                                      f"go to the other actors")
                elif kind == "error":
                    raise payload
                else:
                    if kind == "loaded":
                        self.loads += 1
                        self.load_seconds += payload.seconds
                    yield kind, payload
        finally:
            with stage.cond:
                stage.stop = True
                stage.cond.notify_all()
        left = sum(len(s) for s in stage.work)
        if left:
            raise ApplianceError(f"every Ray actor of this run was lost with {left} items not generated; "
                                 f"run the same command again to continue")
        for a in live:
            rows, tokens, seconds = (now - was for now, was in zip((a.rows, a.tokens, a.seconds), before[id(a)]))
            if rows:
                yield "info", f"{a.where}: {rows} outputs, {tokens} tokens in {seconds:.1f} s ({tokens / seconds if seconds else 0:.1f} tok/s)"

    def _serve(self, actor: _Actor, stage: _Stage, params: SamplingParams) -> None:
        """One driver thread per actor: take a shard, stream it, until no shard is left or in flight."""
        ray = self.cluster.ray
        try:
            while True:
                with stage.cond:
                    while not stage.work and stage.busy and not stage.stop:
                        stage.cond.wait(0.5)
                    if stage.stop or not stage.work:
                        return
                    shard = stage.work.popleft()
                    stage.busy += 1
                done: set[Any] = set()
                start = time.perf_counter()
                try:
                    for kind, payload in self._notices(actor, shard, params):
                        if kind == "done":
                            done.add(payload.key)
                            actor.rows += 1
                            actor.tokens += payload.tokens_out
                        stage.out.put((actor, kind, payload))
                except ray.exceptions.RayTaskError as exc:
                    stage.out.put((actor, "error", _cause(exc)))
                    return
                except ray.exceptions.RayError as exc:
                    actor.alive = False
                    rest = [r for r in shard if r.key not in done]
                    with stage.cond:
                        stage.work.appendleft(rest)
                        stage.busy -= 1
                        stage.cond.notify_all()
                    stage.out.put((actor, "lost", (first_line(exc), len(rest))))
                    return
                finally:
                    actor.seconds += time.perf_counter() - start
                with stage.cond:
                    stage.busy -= 1
                    stage.cond.notify_all()
        except Exception as exc:  # a bug here must fail the run, not end a stage with rows missing
            stage.out.put((actor, "error", ApplianceError(f"internal error serving Ray {actor.where}: {first_line(exc)}")))
        finally:
            stage.out.put((actor, "end", None))

    def _notices(self, actor: _Actor, shard: list[Request], params: SamplingParams) -> Iterator[Notice]:
        """An actor's notices for one shard, as they come (streamed), or all at the end through Ray Client."""
        ray = self.cluster.ray
        if self.cluster.client:
            yield from ray.get(actor.handle.collect.remote(shard, params))
            return
        for ref in actor.handle.stream.remote(shard, params):
            yield from ray.get(ref)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.cluster.ray.kill(actor.handle)
            except Exception:  # already gone with its node
                pass
        self.actors = []


def _cause(exc: Any) -> ApplianceError:
    """The actor's own error (an ApplianceError keeps its one-line message), else the first line of Ray's."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ApplianceError):
        return cause
    return ApplianceError(f"a Ray actor failed: {first_line(cause or exc)}")
