"""A loopback stand-in for the Hugging Face Hub, for tests: the routes that ``HfApi.create_repo``,
``create_branch``, ``repo_info`` and ``upload_folder`` use on the plain-HTTP (non-Xet) upload path, and
the file download route of ``hf_hub_download``.

It binds 127.0.0.1 on a free port, checks the ``Authorization`` header like the Hub, stores what arrives
(regular files inline in the commit, LFS files through the batch API and a PUT), records every request,
and can be told to fail a route. It speaks just enough of the protocol for ``huggingface_hub`` 1.x / 2.x.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
USER = "tester"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as the oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    route: str


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)


class FakeHub:
    """Start with ``with FakeHub(token) as hub:``; ``hub.url`` is the endpoint to give ``HfApi``."""

    def __init__(self, token: str, echo_credentials: bool = False):
        self.token = token
        self.echo_credentials = echo_credentials
        """Misbehave like a careless proxy: echo the received Authorization header in 401 errors."""
        self.fail: dict[str, int] = {}
        """Route name -> HTTP status to answer instead (e.g. ``{"commit": 500}``)."""
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def routes(self) -> list[str]:
        return [r.route for r in self.requests]

    # -- request handling --------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """Answer one request: (status, JSON-able payload), or (status, (file bytes, extra headers))."""
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        route, match = _route(method, path)
        with self._lock:
            self.requests.append(Request(method, path, query, headers, body, route))
            if route in self.fail:
                return self.fail[route], {"error": f"injected failure of route {route!r}"}
            if route != "lfs_upload":  # presigned storage URLs carry no Hub credentials
                sent = headers.get("authorization", "")
                if sent != f"Bearer {self.token}":
                    shown = f" (received {sent!r})" if self.echo_credentials else ""
                    return 401, {"error": f"Invalid credentials in Authorization header{shown}"}
            if route == "unknown":
                return 404, {"error": f"no such route: {method} {path}"}
            return getattr(self, f"_{route}")(match, query, body)

    def _create(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        content = json.loads(body)["content"]
        front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(front[1]) if front else None
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}
        if front and not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata must be a YAML mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def _repo(self, match: re.Match) -> Repo | None:
        return self.repos.get(match["repo"])

    def _info(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        repo = self._repo(match)
        if repo is None:
            return 404, {"error": "Repository not found"}
        revision = unquote(match["rev"] or "main")
        if revision not in repo.heads:
            return 404, {"error": f"Invalid rev id: {revision}"}
        return 200, {"id": match["repo"], "sha": repo.heads[revision], "private": repo.private}

    def _branch(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        repo = self._repo(match)
        if repo is None:
            return 404, {"error": "Repository not found"}
        branch = unquote(match["rev"])
        if branch in repo.branches:
            return 409, {"error": "Reference already exists"}
        repo.branches[branch] = dict(repo.branches["main"])
        repo.heads[branch] = repo.heads["main"]
        return 200, {}

    def _preupload(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        repo = self._repo(match)
        if repo is None:
            return 404, {"error": "Repository not found"}
        base = "main" if query.get("create_pr") == ["1"] else unquote(match["rev"])
        if base not in repo.branches:
            return 404, {"error": f"Invalid rev id: {base}"}
        files = []
        for item in json.loads(body)["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 10_000_000
            entry = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = repo.branches[base].get(item["path"])
            if existing is not None:
                entry["oid"] = hashlib.sha256(existing).hexdigest() if lfs else git_blob_sha1(existing)
            files.append(entry)
        return 200, {"files": files}

    def _resolve(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        repo = self._repo(match)
        revision = unquote(match["rev"])
        if repo is None or revision not in repo.branches:
            return 404, {"error": "Repository not found"}
        content = repo.branches[revision].get(match["path"])
        if content is None:
            return 404, {"error": "Entry not found"}
        return 200, (content, {"X-Repo-Commit": repo.heads[revision], "ETag": f'"{git_blob_sha1(content)}"'})

    def _lfs_batch(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        if self._repo(match) is None:
            return 404, {"error": "Repository not found"}
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/__lfs__/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return 400, {"error": "sha256 of the uploaded content does not match the oid"}
        self.lfs[match["oid"]] = body
        return 200, {}

    def _commit(self, match: re.Match, query: dict, body: bytes) -> tuple[int, Any]:
        repo = self._repo(match)
        if repo is None:
            return 404, {"error": "Repository not found"}
        create_pr = query.get("create_pr") == ["1"]
        revision = "main" if create_pr else unquote(match["rev"])
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        changes: dict[str, bytes] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                changes[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] != "header":
                return 400, {"error": f"unsupported commit operation {line['key']!r}"}
        oid = hashlib.sha1(json.dumps([len(repo.commits), header, sorted(changes)]).encode()).hexdigest()
        if create_pr:
            number = 1 + sum(1 for ref in repo.branches if ref.startswith("refs/pr/"))
            revision = f"refs/pr/{number}"
            repo.branches[revision] = copy.copy(repo.branches["main"])
        repo.branches[revision].update(changes)
        repo.heads[revision] = oid
        repo.commits.append(
            {
                "revision": revision,
                "summary": header["summary"],
                "files": sorted(changes),
                "create_pr": create_pr,
            }
        )
        answer = {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "success": True}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{match['repo']}/discussions/{number}"
        return 200, answer


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>.+))?$"), "info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>.+)$"), "branch"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>.+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>.+)$"), "commit"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _route(method: str, path: str) -> tuple[str, re.Match | None]:
    for verb, pattern, name in _ROUTES:
        match = pattern.match(path)
        if verb == method.replace("HEAD", "GET") and match:
            return name, match
    return "unknown", None


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = hub.handle(self.command, self.path, headers, self._body())
            data, extra = payload if isinstance(payload, tuple) else (json.dumps(payload).encode(), {})
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **extra}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_HEAD = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler
