"""A tiny fake Hugging Face Hub on 127.0.0.1, speaking the HTTP calls huggingface_hub 2.4 makes for downloads.

Served: model info (`/api/models/{repo}[/revision/{rev}]`), the tree listing (`/api/models/{repo}/tree/{rev}`),
and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with the X-Repo-Commit/ETag/X-Linked-* headers and Range resumes.
Switches: private repos (401 without a known token), gated repos (403 on files), and connections dropped mid-file.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Files the real Hub stores in LFS: their ETag is the content sha256, announced in X-Linked-Etag.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")

_API_RE = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree_rev>[^/]+)(?P<sub>/.*)?)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class FakeRepo:
    """One repo: commits (sha -> files) and branches (name -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class Request:
    """One request the fake Hub answered, for assertions (what was fetched, which headers were sent)."""

    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    """Configure repos, then `with hub.running():` and point HF_ENDPOINT at `hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: set[str] = set()  # tokens that may read private and gated repos
        self.requests: list[Request] = []
        self._cuts: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        branches: dict[str, dict[str, bytes]] | None = None,
        private: bool = False,
        gated: bool = False,
    ) -> dict[str, str]:
        """Add a repo whose `main` holds `files` (or one commit per entry of `branches`); returns branch -> sha."""
        repo = FakeRepo(private=private, gated=gated)
        for name, content in (branches or {"main": files or {}}).items():
            sha = hashlib.sha1(f"{repo_id}@{name}".encode() + json.dumps(sorted(content)).encode()).hexdigest()
            repo.commits[sha] = dict(content)
            repo.branches[name] = sha
        self.repos[repo_id] = repo
        return dict(repo.branches)

    def interrupt(self, repo_id: str, filename: str, cuts: list[int]) -> None:
        """Make the next len(cuts) GETs of a file drop the connection after sending cuts[i] body bytes."""
        self._cuts[(repo_id, filename)] = list(cuts)

    def file_gets(self, filename: str) -> list[Request]:
        """The GET requests that downloaded `filename` (any repo, any revision)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)]

    def fetched(self) -> set[str]:
        """Names of all files downloaded with GET so far."""
        return {unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]) for r in self.file_gets("")}

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        # Port 0: the OS picks a free port; loopback only, never another address.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @contextmanager
    def running(self) -> Iterator[FakeHub]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- internals used by the handler ---------------------------------------------------------------------------
    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_cut(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            cuts = self._cuts.get((repo_id, filename))
            return cuts.pop(0) if cuts else None


def git_blob_sha(content: bytes) -> str:
    """The git object id the Hub reports for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        # -- routing ---------------------------------------------------------------------------------------------
        def _dispatch(self, *, head: bool) -> None:
            hub._record(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            path = urlsplit(self.path).path
            if (m := _API_RE.match(path)) and not head:
                self._api(unquote(m["repo"]), m["rev"] or m["tree_rev"], tree=m["tree_rev"] is not None)
            elif m := _RESOLVE_RE.match(path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head=head)
            else:
                self._error(404, "Not Found")

        def _repo_and_commit(self, repo_id: str, revision: str, *, files: bool) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", code="RepoNotFound")
                return None
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token is not None and token not in hub.tokens:
                # What the Hub says for a wrong token; huggingface_hub keeps it a plain 401 HfHubHTTPError.
                self._error(401, "Invalid credentials in Authorization header")
                return None
            if repo.private and token is None:
                self._error(401, "Invalid username or password.", code="RepoNotFound")
                return None
            if repo.gated and files and token is None:
                self._error(
                    401,
                    "Access to model is restricted. You must have access to it and be authenticated.",
                    code="GatedRepo",
                )
                return None
            commit = repo.commit_of(revision)
            if commit is None:
                self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
                return None
            return repo, commit

        def _api(self, repo_id: str, revision: str | None, *, tree: bool) -> None:
            found = self._repo_and_commit(repo_id, revision or "main", files=False)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            if tree:
                body: object = [_tree_entry(name, content) for name, content in sorted(files.items())]
            else:
                body = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "gated": "auto" if repo.gated else False,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
            found = self._repo_and_commit(repo_id, revision, files=True)
            if found is None:
                return
            repo, commit = found
            content = repo.commits[commit].get(filename)
            if content is None:
                self._error(404, "Entry not found", code="EntryNotFound", extra={"X-Repo-Commit": commit})
                return
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if filename.endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(content).hexdigest()
                headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content))}
            else:
                headers["ETag"] = f'"{git_blob_sha(content)}"'
            start, status = 0, 200
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and not head:
                start = int(ranged[1])
                end = int(ranged[2]) if ranged[2] else len(content) - 1
                if start >= len(content):
                    self._error(416, "Range Not Satisfiable", extra={"Content-Range": f"bytes */{len(content)}"})
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start : end + 1], 206
            if head:
                self._send(200, b"", headers, length=len(content))
                return
            cut = hub._next_cut(repo_id, filename)
            if cut is None or cut >= len(content):
                self._send(status, content, headers)
                return
            # Promise the whole body, send part of it, then hang up: what a dropped connection looks like.
            self._send(status, content[:cut], headers, length=len(content))
            self.close_connection = True

        # -- responses -------------------------------------------------------------------------------------------
        def _error(self, status: int, message: str, *, code: str | None = None, extra: dict[str, str] | None = None):
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code is not None:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str], *, length: int | None = None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()

    return Handler


def _tree_entry(name: str, content: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": name, "size": len(content), "oid": git_blob_sha(content)}
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry
