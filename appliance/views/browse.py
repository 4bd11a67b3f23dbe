"""`appliance browse`: Datasette over the appliance database, read-only, on loopback only, offline.

Datasette serves its own CSS and JavaScript from its package (no CDN), and it runs in the CLI's
process, so the offline guard the CLI arms stays armed while it serves. Every connection it opens to
the database is `mode=ro` and `PRAGMA query_only`, so neither a crafted query nor a plugin can write.
The metadata (table and column descriptions, facets, canned queries) lives in `datasette.yaml`.
"""

from __future__ import annotations

import errno
import json
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import yaml
from datasette import hookimpl

from ..errors import ApplianceError
from ..store import Store

HOST = "127.0.0.1"
DEFAULT_PORT = 8001
METADATA_FILE = Path(__file__).with_name("datasette.yaml")


class BrowseError(ApplianceError):
    """The database cannot be served as asked (a busy port, no database)."""


def metadata(db_name: str) -> dict[str, Any]:
    """Datasette metadata for the database Datasette names `db_name` (the file's stem)."""
    data = yaml.safe_load(METADATA_FILE.read_text(encoding="utf-8"))
    database = {"tables": data.pop("tables"), "queries": data.pop("queries")}
    return {**data, "databases": {db_name: database}}


def targets_json(config_json: str | None) -> str:
    """SQL function `appliance_targets(config_json)`: the examples a task run's spec asks for, as a JSON
    array of {task, label, target} ([] for other runs), so a canned query can put kept against target."""
    from .report import spec_targets

    try:
        config = json.loads(config_json or "{}")
        return json.dumps([{"task": t, "label": label, "target": n} for (t, label), n in spec_targets(config).items()])
    except Exception:  # a SQL function must not raise: an unreadable config has no targets
        return "[]"


@hookimpl
def prepare_connection(conn: sqlite3.Connection, database: str, datasette: Any) -> None:
    """Datasette hook: make the connections to the appliance database read-only and give them
    `appliance_targets` (other databases and Datasette instances in the process are left alone)."""
    if database != getattr(datasette, "appliance_db", None):  # not ours, or Datasette's own _internal catalog
        return
    conn.execute("PRAGMA query_only = 1")
    conn.create_function("appliance_targets", 1, targets_json, deterministic=True)


READ_METHODS = {"GET", "HEAD", "OPTIONS"}


@hookimpl
def asgi_wrapper(datasette: Any) -> Any:
    """Datasette hook: our server answers anything but a read (a POST to `/-/insert`, a write query form)
    with 405 and one line in the log, before Datasette sees it: the database is read-only."""
    if getattr(datasette, "appliance_db", None) is None:
        return None

    def wrap(app: Any) -> Any:
        async def read_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope.get("method", "GET") not in READ_METHODS:
                _log(f"{scope['method']} {scope.get('path', '')}: refused (405), the database is served read-only")
                body = b"405 Method Not Allowed: appliance browse serves the database read-only\n"
                await send({"type": "http.response.start", "status": 405,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD")]})
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        return read_only

    return wrap


@hookimpl
def handle_exception(datasette: Any, request: Any, exception: BaseException) -> Any:
    """Datasette hook, in place of its default handler (which prints every error's traceback with its
    local variables to the terminal): the same error page or JSON, and one line in the log."""
    from datasette import Response
    from datasette.utils.asgi import Base400
    from datasette.views.base import DatasetteError
    from markupsafe import Markup

    async def inner() -> Any:
        title = None
        if isinstance(exception, Base400):
            status, info, message = exception.status, {}, exception.args[0]
        elif isinstance(exception, DatasetteError):
            status, info, message, title = exception.status, exception.error_dict, exception.message, exception.title
            if exception.message_is_html:
                message = Markup(message)
        else:
            status, info, message = 500, {}, str(exception)
        _log(f"{request.method} {request.path}: {status} {type(exception).__name__}: {str(message).splitlines()[0] if message else ''}")
        info.update({"ok": False, "error": message, "status": status, "title": title})
        if request.path.split("?")[0].endswith(".json"):
            return Response.json(info, status=status)
        template = datasette.jinja_env.select_template([f"{status}.html", "error.html"])
        page = await template.render_async(dict(info, urls=datasette.urls, app_css_hash=datasette.app_css_hash(), menu_links=lambda: []))
        return Response.html(page, status=status)

    return inner


def _log(line: str) -> None:
    print(f"browse: {line}", file=sys.stderr, flush=True)


def _register_plugin() -> None:
    from datasette.plugins import pm

    if pm.get_plugin(__name__) is None:
        default = pm.get_plugin("datasette.handle_exception")
        if default is not None:  # ours answers the same, without a traceback per bad query
            pm.unregister(default)
        pm.register(sys.modules[__name__], __name__)


def check_database(path: Path) -> Path:
    """The database file, checked the way every read-only command checks it (exists, is SQLite)."""
    Store(path, readonly=True).close()
    return path.resolve()


def make_datasette(path: Path) -> Any:
    """A Datasette instance serving `path` read-only with the appliance's metadata."""
    from datasette.app import Datasette

    path = check_database(path)
    _register_plugin()
    ds = Datasette(
        files=[str(path)],
        metadata=metadata(path.stem),
        # No suggested facets: Datasette tries every column of a table page as a facet, which was 90% of
        # the generations page at 100k rows (2 s); the facets metadata names are still shown.
        settings={"sql_time_limit_ms": 3000, "facet_time_limit_ms": 500, "suggest_facets": False, "allow_download": False},
    )
    ds.appliance_db = path.stem
    ds.client = type(ds.client)(ds)  # its app was built before the mark above: build it again, read-only wrapper included
    return ds


def bind(port: int) -> socket.socket:
    """A listening socket on the loopback address; a busy port is a one-line error, not a traceback."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BrowseError(f"port {port} on {HOST} is already in use (another `appliance browse`?); "
                              "choose one with --port") from None
        raise BrowseError(f"cannot listen on {HOST}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(path: Path, port: int = DEFAULT_PORT, open_browser: bool = False, on_ready: Any = None) -> None:
    """Serve until interrupted. `on_ready(url)` is called once the socket listens."""
    import uvicorn

    ds = make_datasette(path)
    sock = bind(port)
    url = f"http://{HOST}:{sock.getsockname()[1]}/"
    if on_ready:
        on_ready(url)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(ds.app(), log_level="warning", lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: uvicorn has shut down; nothing was written, nothing to resume
        pass
    finally:
        sock.close()
