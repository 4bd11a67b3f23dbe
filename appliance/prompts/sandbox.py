"""The chat-template render worker: one sandboxed Python subprocess that renders untrusted Jinja2 templates.

This process (`render_in_worker`) sends it length-prefixed JSON requests and kills it when one render takes longer
than `RENDER_TIMEOUT_S`, replies too much or dies; the subprocess (`worker_main`) renders in Jinja2's
`ImmutableSandboxedEnvironment` under a `WORKER_MEMORY_BYTES` address-space limit and answers every
failure with a kind (`raised`, `security`, `syntax`, `output`, `memory`, `error`) for `appliance.chat`
to word. See `appliance.chat` for why template code never runs in this process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ChatTemplateError

RENDER_TIMEOUT_S = 5.0  # one render; real templates take well under a millisecond
WORKER_MEMORY_BYTES = 512 << 20  # address space of the render worker (Python + Jinja2 need ~30 MB)
_WORKER_START_TIMEOUT_S = 60.0  # importing Jinja2 on a busy machine


def render_in_worker(payload: dict[str, Any], model_name: str, where: str) -> dict[str, Any]:
    """The worker's reply to one render request ({"ok": True, "text": ...} or {"ok": False, "kind": ...});
    ChatTemplateError when the worker times out, crashes or cannot start."""
    return _WORKER.request(payload, model_name, where)


class _Worker:
    """One sandboxed render subprocess per process, started on first use; killed and replaced after a
    timeout or a crash. Requests and replies are length-prefixed JSON over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner = 0
        self.lock = threading.Lock()

    def request(self, payload: dict[str, Any], model_name: str, where: str) -> dict[str, Any]:
        data = json.dumps(payload).encode("utf-8")
        with self.lock:
            for attempt in (1, 2):
                proc = self._ensure(model_name)
                try:
                    os.write(proc.stdin.fileno(), len(data).to_bytes(4, "big"))  # type: ignore[union-attr]
                    _write_all(proc.stdin.fileno(), data)  # type: ignore[union-attr]
                except (BrokenPipeError, OSError):
                    self._stop()  # died between renders: start a fresh one once
                    if attempt == 2:
                        lost = f"chat template of {model_name}: the render worker cannot start"
                        raise ChatTemplateError(lost, "crash") from None
                    continue
                return self._reply(proc, payload["max_chars"], model_name, where)
        raise AssertionError("unreachable")

    def _reply(self, proc: subprocess.Popen[bytes], max_chars: int, model_name: str, where: str) -> dict[str, Any]:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        try:
            n = int.from_bytes(_read_exact(fd, 4, deadline), "big")
            if n > 4 * max_chars + 4096:
                self._stop()
                return {"ok": False, "kind": "output"}
            return json.loads(_read_exact(fd, n, deadline))
        except TimeoutError:
            self._stop()
            raise ChatTemplateError(
                f"chat template of {model_name} ({where}) did not finish rendering within "
                f"{RENDER_TIMEOUT_S:g} s (a runaway loop?)",
                "timeout",
            ) from None
        except EOFError:
            code = self._stop()
            raise ChatTemplateError(
                f"chat template of {model_name} ({where}): the render worker ended unexpectedly "
                f"(exit code {code})",
                "crash",
            ) from None

    def _ensure(self, model_name: str) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.owner == os.getpid() and self.proc.poll() is None:
            return self.proc
        if self.owner != os.getpid():
            self.proc = None  # inherited through fork: the parent's worker, not ours to use
        else:
            self._stop()
        root = str(Path(__file__).resolve().parents[2])
        boot = f"import sys; sys.path.insert(0, {root!r}); from appliance.prompts.sandbox import worker_main; worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True
        )
        self.owner = os.getpid()
        try:
            deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
            ready = _read_exact(self.proc.stdout.fileno(), 5, deadline)  # type: ignore[union-attr]
        except (TimeoutError, EOFError):
            ready = b""
        if ready != b"ready":
            code = self._stop()
            raise ChatTemplateError(
                f"chat template of {model_name}: the render worker did not start (exit code {code})", "crash"
            )
        return self.proc

    def _stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        return proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.owner == os.getpid():
            self._stop()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


_WORKER = _Worker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):  # a forked child starts its own worker (the lock may have been held at fork)
    os.register_at_fork(after_in_child=_WORKER.__init__)


def worker_main() -> None:
    """The render worker's loop (runs in the subprocess): limit memory, then render requests until EOF."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platforms without RLIMIT_AS
        pass
    parent = os.getppid()

    def watch_parent() -> None:  # an orphaned worker stuck in a runaway loop must not spin forever
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    env = _sandbox()
    cache: dict[str, Any] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"ready")
    stdout.flush()
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        request = json.loads(stdin.read(int.from_bytes(head, "big")))
        try:
            reply = {"ok": True, "text": _render_in_sandbox(env, cache, request)}
        except MemoryError:
            reply = {"ok": False, "kind": "memory"}
        except BaseException as exc:  # noqa: BLE001 - everything becomes a reply; the loop goes on
            reply = {"ok": False, **_classify(exc)}
        data = json.dumps(reply).encode("utf-8")
        stdout.write(len(data).to_bytes(4, "big") + data)
        stdout.flush()


class _TemplateRaised(Exception):
    """The template's own raise_exception(message)."""


class _OutputTooLarge(Exception):
    pass


def _classify(exc: BaseException) -> dict[str, str]:
    import jinja2.exceptions
    import jinja2.sandbox

    if isinstance(exc, _TemplateRaised):
        return {"kind": "raised", "message": str(exc)}
    if isinstance(exc, jinja2.sandbox.SecurityError):
        return {"kind": "security", "message": str(exc)}
    if isinstance(exc, jinja2.exceptions.TemplateSyntaxError):
        return {"kind": "syntax", "message": f"line {exc.lineno}: {exc.message}"}
    if isinstance(exc, _OutputTooLarge):
        return {"kind": "output", "message": ""}
    if isinstance(exc, RecursionError):
        return {"kind": "error", "message": "recursion too deep"}
    return {"kind": "error", "message": f"{type(exc).__name__}: {exc}"}


def _sandbox() -> Any:
    """Jinja2 set up the way transformers renders chat templates, in the immutable sandbox."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox

    class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # refuse at once, rather than hand back an Undefined that prints as "" and is tested as false
            raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """transformers' {% generation %} marks the assistant's tokens for training masks; rendering ignores it."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise _TemplateRaised(message)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _render_in_sandbox(env: Any, cache: dict[str, Any], request: dict[str, Any]) -> str:
    source = request["template"]
    template = cache.get(source)
    if template is None:
        if len(cache) > 16:
            cache.clear()
        template = cache[source] = env.from_string(source)
    context = {"tools": None, "documents": None, **request["context"]}
    limit, size, parts = int(request["max_chars"]), 0, []
    for piece in template.generate(**context):
        size += len(piece)
        if size > limit:
            raise _OutputTooLarge
        parts.append(piece)
    return "".join(parts)
