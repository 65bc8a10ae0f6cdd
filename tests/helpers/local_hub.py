"""A Hub-protocol HTTP server on 127.0.0.1 for testing pushes with the real huggingface_hub client.

Why: the Hub is unreachable here and a mocked client would only test the mock. This answers the
requests huggingface_hub 2.x really sends for `create_repo` + `upload_folder`:
  POST /api/repos/create                      {"name", "organization", "visibility"?, "type"?}
  POST /api/validate-yaml                     {"content", "repoType"}  (when README.md is uploaded)
  POST /api/{type}s/{repo}/preupload/{rev}    {"files": [{"path", "sample", "size"}]}
  POST /api/{type}s/{repo}/commit/{rev}       NDJSON: a "header" line, then one line per operation
  POST /api/{type}s/{repo}/branch/{branch}    {"startingPoint"?}
  GET  /api/{type}s/{repo}[/revision/{rev}]   repo info (asked when nothing changed)
  GET  /api/whoami-v2
Every file is answered "regular" (so contents travel base64 inside the commit: no LFS/Xet storage)
together with the git oid of the stored copy, which lets the client skip unchanged files.
Repos live in memory per branch, so tests can compare bytes and count commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create", re.compile(r"/api/repos/create")),
    ("POST", "validate-yaml", re.compile(r"/api/validate-yaml")),
    ("POST", "preupload", re.compile(_REPO + r"/preupload/(?P<rev>[^/]+)")),
    ("POST", "commit", re.compile(_REPO + r"/commit/(?P<rev>[^/]+)")),
    ("POST", "branch", re.compile(_REPO + r"/branch/(?P<rev>[^/]+)")),
    ("GET", "whoami", re.compile(r"/api/whoami-v2")),
    ("GET", "info", re.compile(_REPO + r"(?:/revision/(?P<rev>[^/]+))?")),
]
_NEEDS_AUTH = {"create", "preupload", "commit", "branch", "whoami"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def git_hash(data: bytes) -> str:
    """The git blob oid, which the client compares with its own to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    changed: list[str]  # paths added, modified or deleted by this commit


@dataclass
class Repo:
    private: bool
    branches: dict[str, list[Commit]]


@dataclass
class Failure:
    """An injected fault: `status=None` drops the connection without answering."""

    route: str
    status: int | None
    after: int = 0  # let this many matching requests through first
    times: int | None = None  # then fail this many times (None: forever)
    echo_auth: bool = False  # quote the Authorization header back (tests secret scrubbing)
    seen: int = 0


@dataclass
class Seen:
    method: str
    path: str
    route: str | None
    authorization: str | None


class _Reply(Exception):
    """An error answer: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


@dataclass
class LocalHub:
    """Threaded Hub stand-in; use as a context manager so it always shuts down."""

    user: str = "local-user"
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, route: str, status: int | None = 500, **kw: Any) -> Failure:
        """Make `route` ("create", "commit", ..., or "*") fail; see `Failure`."""
        failure = Failure(route, status, **kw)
        self.failures.append(failure)
        return failure

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list:
        return list(self.repos[(repo_type, repo_id)].branches[revision])

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict:
        return dict(self.commits(repo_id, revision, repo_type)[-1].files)

    def count(self, route: str) -> int:
        return sum(1 for seen in self.requests if seen.route == route)

    @property
    def authorizations(self) -> list[str | None]:
        return [seen.authorization for seen in self.requests]

    def _failure_for(self, route: str) -> Failure | None:
        with self._lock:
            for f in self.failures:
                if f.route not in (route, "*"):
                    continue
                f.seen += 1
                if f.seen > f.after and (f.times is None or f.seen - f.after <= f.times):
                    return f
        return None

    def _url(self, rtype: str, repo_id: str) -> str:
        prefix = "" if rtype == "model" else f"{rtype}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    def _repo(self, m: re.Match[str]) -> Repo:
        repo = self.repos.get((m["type"], m["repo"]))
        if repo is None:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        return repo

    def _branch(self, repo: Repo, rev: str | None) -> list[Commit]:
        name = unquote(rev or "main")
        if name not in repo.branches:
            raise _Reply(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return repo.branches[name]

    def handle(self, route: str, m: re.Match[str], body: bytes) -> dict[str, Any]:
        """Answer one request (under the lock); raise `_Reply` for errors."""
        if route == "create":
            p = json.loads(body)
            rtype = p.get("type") or "model"
            repo_id = f"{p.get('organization') or self.user}/{p['name']}"
            url = self._url(rtype, repo_id)
            if (rtype, repo_id) in self.repos:
                raise _Reply(409, f"You already created this {rtype} repo", url=url)
            init = Commit(git_hash(f"init {rtype}/{repo_id}".encode()), "initial commit", {}, [])
            self.repos[(rtype, repo_id)] = Repo(p.get("visibility") == "private", {"main": [init]})
            return {"url": url, "name": repo_id, "id": repo_id}
        if route == "validate-yaml":
            return _validate_yaml(json.loads(body)["content"])
        if route == "whoami":
            return {"type": "user", "name": self.user, "auth": {"type": "access_token"}}
        repo = self._repo(m)
        if route == "branch":
            name = unquote(m["rev"])
            if name in repo.branches:
                raise _Reply(409, f"Reference already exists: refs/heads/{name}")
            start = (json.loads(body or b"{}") or {}).get("startingPoint")
            repo.branches[name] = [self._branch(repo, start)[-1]]
            return {}
        branch = self._branch(repo, m["rev"])
        if route == "info":
            head = branch[-1]
            siblings = [{"rfilename": path} for path in sorted(head.files)]
            return {"id": m["repo"], "sha": head.oid, "private": repo.private, "siblings": siblings}
        if route == "preupload":  # the stored oid lets the client skip unchanged files
            stored = {p: git_hash(data) for p, data in branch[-1].files.items()}
            paths = [f["path"] for f in json.loads(body)["files"]]
            modes = [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]
            return {"files": [{**mode, "oid": stored.get(mode["path"])} for mode in modes]}
        commit = _apply_commit(branch[-1], body)  # route == "commit"
        branch.append(commit)
        url = f"{self._url(m['type'], m['repo'])}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""}


def _validate_yaml(content: str) -> dict[str, Any]:
    """Like the Hub: the front matter must be a YAML mapping and base_model a hub id."""
    if not content.startswith("---\n"):
        return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
    try:
        meta = yaml.safe_load(content[4 : content.index("\n---", 3)])
    except (ValueError, yaml.YAMLError) as exc:
        raise _Reply(400, "invalid YAML", errors=[{"message": str(exc)}]) from exc
    if not isinstance(meta, dict):
        raise _Reply(400, "invalid YAML", errors=[{"message": "metadata must be a mapping"}])
    bases = meta.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        if not _HUB_ID.fullmatch(str(base)):
            raise _Reply(400, "bad base_model", errors=[{"message": f"bad base_model {base!r}"}])
    return {"errors": [], "warnings": []}


def _apply_commit(head: Commit, body: bytes) -> Commit:
    """Apply an NDJSON commit body on top of `head`; only inline (regular) files are accepted."""
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise _Reply(400, "commit body must start with a header line")
    header = lines[0]["value"]
    if header.get("parentCommit") not in (None, head.oid):
        raise _Reply(412, "parent commit is not the head of the branch")
    files, changed = dict(head.files), []
    for op in lines[1:]:
        key, value = op["key"], op["value"]
        path = value["path"]
        if key == "file":
            files[path] = base64.b64decode(value["content"])
            changed.append(path)
        elif key in ("deletedFile", "deletedFolder"):
            gone = [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]
            if not gone:
                raise _Reply(404, "A file with this name doesn't exist", "EntryNotFound")
            for p in gone:
                del files[p]
            changed += gone
        else:  # lfsFile: never asked for, since preupload answers "regular"
            raise _Reply(400, f"unsupported commit operation {key!r} for {path}")
    digest = "".join(f"{p}:{git_hash(files[p])}" for p in sorted(files))
    oid = git_hash(f"{head.oid}\n{header.get('summary')}\n{digest}".encode())
    return Commit(oid, header.get("summary", ""), files, changed)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to `LocalHub.handle`, honouring auth and injected failures."""

    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _read_body(self) -> bytes:  # the client always sends Content-Length
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        hub: LocalHub = self.server.hub
        body = self._read_body()
        path = urlsplit(self.path).path
        route, match = None, None
        for verb, name, rx in _ROUTES:
            if verb == method and (match := rx.fullmatch(path)):
                route = name
                break
        auth = self.headers.get("Authorization")
        with hub._lock:
            hub.requests.append(Seen(method, path, route, auth))
        try:
            if route is None or match is None:
                raise _Reply(404, f"no route for {method} {path}")
            failure = hub._failure_for(route)
            if failure is not None and failure.status is None:
                self.close_connection = True  # answer nothing: the client sees a dropped link
                return
            if failure is not None:
                echo = f" (Authorization: {auth})" if failure.echo_auth else ""
                raise _Reply(failure.status or 500, f"injected failure on {route}{echo}")
            if route in _NEEDS_AUTH and not (auth or "").startswith("Bearer "):
                raise _Reply(401, "Invalid credentials in Authorization header")
            with hub._lock:
                payload = hub.handle(route, match, body)
            self._send(200, payload)
        except _Reply as reply:
            self._send(reply.status, {"error": str(reply), **reply.extra}, reply.code)

    def _send(self, status: int, payload: dict[str, Any], code: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        if status >= 400:
            self.send_header("X-Error-Message", payload["error"])
        self.end_headers()
        self.wfile.write(data)
