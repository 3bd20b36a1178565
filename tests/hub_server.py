"""A tiny fake Hugging Face Hub on 127.0.0.1, speaking the HTTP calls huggingface_hub 2.4 makes for downloads
and for uploads over the LFS protocol (tests set HF_HUB_DISABLE_XET=1: this server does not speak Xet).

Downloads: model info (`/api/models/{repo}[/revision/{rev}]`), the tree listing (`/api/models/{repo}/tree/{rev}`),
`POST /api/models/{repo}/paths-info/{rev}`, and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with the
X-Repo-Commit/ETag/X-Linked-* headers and byte ranges.
Uploads: `POST /api/repos/create`, `POST /api/models/{repo}/branch/{b}`, `POST /api/models/{repo}/preupload/{rev}`,
`POST /{repo}.git/info/lfs/objects/batch`, the `PUT` of each LFS object (no auth header, as to the Hub's storage),
`POST /api/validate-yaml` (the card's YAML is parsed) and `POST /api/models/{repo}/commit/{rev}` (ndjson; one
commit per call, `create_pr=1` opens refs/pr/N).
Switches: private repos (401 without a known token), gated repos (401 on files), write tokens (401 without a
token, 403 with a read-only one), connections dropped mid-file, and LFS uploads held until released.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from huggingface_hub import constants, file_download
from huggingface_hub.utils._http import close_session

# Files the real Hub stores in LFS: their ETag is the content sha256, announced in X-Linked-Etag.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")

_API_RE = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree_rev>[^/]+)(?P<sub>/.*)?)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_WRITE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<what>preupload|commit|branch)/(?P<rev>.+)$")
_PATHS_INFO_RE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/paths-info/(?P<rev>[^/]+)$")
_BATCH_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)\.git/info/lfs/objects/batch$")
_CDN_RE = re.compile(r"^/lfs-cdn/(?P<oid>[0-9a-f]{64})$")
_LFS_PUT_RE = re.compile(r"^/lfs-storage/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<oid>[0-9a-f]{64})$")


@dataclass
class FakeRepo:
    """One repo: commits (sha -> files) and branches (name -> sha)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects uploaded, by sha256, committed or not
    history: list[tuple[str, str]] = field(default_factory=list)  # (branch, summary) of each commit pushed

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
        self.write_tokens: set[str] = set()  # tokens that may also create repos and push
        self.hold_uploads_after: int | None = None  # LFS PUTs past this count wait until `release_uploads`
        self.uploads_held = threading.Event()  # set when a PUT is being held
        self._release = threading.Event()
        self.requests: list[Request] = []
        self.latency_s = 0.0  # each file GET waits this long before answering: a round trip to a distant Hub
        self.most_in_flight = 0  # the most file GETs waiting out `latency_s` at once: requests made in parallel
        self._waiting = 0
        # As the Hub does for LFS files: resolve answers 302 to a signed storage link (here /lfs-cdn/OID?link=N,
        # same host), valid until `expire_links()` moves the generation on.
        self.cdn_links = False
        self.link_generation = 0
        self.expire_links_at: int | None = None  # links expire (once) when this many storage GETs have come in
        self._cdn: dict[str, tuple[str, str, bytes]] = {}  # oid -> (repo, file, content) of links handed out
        self._cuts: dict[tuple[str, str], list[int]] = {}
        # (id, kind) -> (content, digest): each file hashed once, not per request (the content is held, so its id
        # is never reused while cached).
        self._digests: dict[tuple[int, str], tuple[bytes, str]] = {}
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
            for filename, data in content.items():  # hashed now, not inside the first request for the file
                self._tree_entry(filename, data)
        self.repos[repo_id] = repo
        return dict(repo.branches)

    def interrupt(self, repo_id: str, filename: str, cuts: list[int]) -> None:
        """Make the next len(cuts) GETs of a file drop the connection after sending cuts[i] body bytes."""
        self._cuts[(repo_id, filename)] = list(cuts)

    def expire_links(self) -> None:
        """Every storage link handed out so far is refused from now on (403, as an expired signed URL)."""
        with self._lock:
            self.link_generation += 1

    def cdn_gets(self) -> list[Request]:
        """The GETs of storage links (range reads that reused a resolved location)."""
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/lfs-cdn/")]

    def release_uploads(self) -> None:
        self.hold_uploads_after = None
        self._release.set()

    def uploads(self) -> list[Request]:
        """The LFS object PUTs received (each one a file's bytes sent to storage)."""
        return [r for r in self.requests if r.method == "PUT"]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What `revision` of a repo holds now."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.commit_of(revision)])

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

    def digest(self, content: bytes, kind: str) -> str:
        """The file's "sha256" (its LFS oid) or "git" blob id, computed once: hashing a 1 GB shard for every range
        request or listing took about a second each time (what made the streamed benchmark slow)."""
        key = (id(content), kind)
        with self._lock:
            found = self._digests.get(key)
        if found is None:
            value = hashlib.sha256(content).hexdigest() if kind == "sha256" else git_blob_sha(content)
            found = (content, value)
            with self._lock:
                self._digests[key] = found
        return found[1]

    def _tree_entry(self, name: str, content: bytes) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "path": name, "size": len(content)}
        entry["oid"] = self.digest(content, "git")
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": self.digest(content, "sha256"), "size": len(content), "pointerSize": 134}
        return entry

    def _next_cut(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            cuts = self._cuts.get((repo_id, filename))
            return cuts.pop(0) if cuts else None


AGENT_REGISTRY = "/api/agent-harnesses"


def git_blob_sha(content: bytes) -> str:
    """The git object id the Hub reports for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and a small body go out as two writes: with Nagle on, the body waits for the client's delayed
        # ACK of the headers, about 40 ms a request.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_POST(self) -> None:
            hub._record(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            body = self._body()
            if path == "/api/repos/create":
                self._create_repo(json.loads(body))
            elif path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body)["content"])
            elif m := _PATHS_INFO_RE.match(path):  # a read, over POST: the paths come form-encoded
                self._paths_info(unquote(m["repo"]), unquote(m["rev"]), parse_qs(body.decode()).get("paths", []))
            elif m := _WRITE_RE.match(path):
                repo_id, revision = unquote(m["repo"]), unquote(m["rev"])
                if m["what"] == "preupload":
                    self._preupload(repo_id, revision, json.loads(body))
                elif m["what"] == "branch":
                    self._create_branch(repo_id, revision, json.loads(body) if body else {})
                else:
                    self._commit(repo_id, revision, body, create_pr=query.get("create_pr") == ["1"])
            elif m := _BATCH_RE.match(path):
                self._lfs_batch(unquote(m["repo"]), json.loads(body))
            else:
                self._error(404, "Not Found")

        def do_PUT(self) -> None:
            hub._record(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            m = _LFS_PUT_RE.match(urlsplit(self.path).path)
            if m is None:
                self._error(404, "Not Found")
                return
            body = self._body()
            with hub._lock:
                held = hub.hold_uploads_after is not None and len(hub.uploads()) > hub.hold_uploads_after
            if held:  # the client is killed meanwhile: this upload never completes
                hub.uploads_held.set()
                hub._release.wait(timeout=60)
                self._error(500, "upload interrupted")
                return
            repo = hub.repos.get(unquote(m["repo"]))
            if repo is None or hashlib.sha256(body).hexdigest() != m["oid"]:
                self._error(400, "object does not match its oid")
                return
            repo.lfs[m["oid"]] = body
            self._send(200, b"", {})

        def _body(self) -> bytes:
            """The request body, sent with a Content-Length or chunked (httpx streams a file object chunked)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        # -- writes ----------------------------------------------------------------------------------------------
        def _writer(self) -> bool:
            """True for a token that may write; else answers 401 (no or unknown token) or 403 (read-only)."""
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token in hub.write_tokens:
                return True
            if token is None or token not in hub.tokens:
                self._error(401, "Invalid username or password.")
            else:
                self._error(403, "You don't have the rights to create a model under this namespace")
            return False

        def _writable_repo(self, repo_id: str) -> FakeRepo | None:
            if not self._writer():
                return None
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", code="RepoNotFound")
            return repo

        def _create_repo(self, payload: dict) -> None:
            if not self._writer():
                return
            repo_id = "/".join(part for part in (payload.get("organization"), payload["name"]) if part)
            if repo_id in hub.repos:  # the Hub's answer names the repo's URL too
                message = "You already created this model repo"
                body = json.dumps({"error": message, "url": f"{hub.url}/{repo_id}"}).encode()
                self._send(409, body, {"Content-Type": "application/json", "X-Error-Message": message})
                return
            hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            # huggingface_hub 2.x sends "visibility"; older clients sent "private".
            hub.repos[repo_id].private = payload.get("visibility") == "private" or payload.get("private") is True
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            if branch in repo.branches:
                self._error(409, f"Branch {branch} already exists")
                return
            start = repo.commit_of(payload.get("startingPoint") or "main")
            repo.branches[branch] = start
            self._json(200, {})

        def _validate_yaml(self, content: str) -> None:
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match[1]) if match else None
            except yaml.YAMLError as exc:
                self._json(400, {"errors": [{"message": f"YAML: {exc}"}], "warnings": []})
                return
            if match is not None and not isinstance(meta, dict):
                self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
                return
            self._json(200, {"errors": [], "warnings": []})

        def _paths_info(self, repo_id: str, revision: str, paths: list[str]) -> None:
            found = self._repo_and_commit(repo_id, revision, files=False)
            if found is None:
                return
            repo, commit = found
            files = repo.commits[commit]
            self._json(200, [hub._tree_entry(path, files[path]) for path in paths if path in files])

        def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            current = repo.commits.get(repo.commit_of(revision) or "", {})
            files = []
            for entry in payload["files"]:
                lfs = entry["path"].endswith(LFS_SUFFIXES)
                old = current.get(entry["path"])
                oid = None if old is None else hub.digest(old, "sha256" if lfs else "git")
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            self._json(200, {"files": files, "commitOid": repo.commit_of(revision)})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, object] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in repo.lfs:  # no "actions": the storage already holds it, nothing to send
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-storage/{repo_id}/{obj['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, revision: str, body: bytes, *, create_pr: bool) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            parent = repo.commit_of(revision)
            if parent is None:
                self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
                return
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = dict(repo.commits[parent])
            summary = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    summary = value["summary"]
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in repo.lfs:
                        self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                        return
                    files[value["path"]] = repo.lfs[value["oid"]]
                elif key == "deletedFile" and files.pop(value["path"], None) is None:
                    self._error(404, "A file with this name doesn't exist", code="EntryNotFound")
                    return
            sha = hashlib.sha1(f"{repo_id}:{parent}:{summary}:{len(repo.commits)}".encode()).hexdigest()
            repo.commits[sha] = files
            pr_url = None
            if create_pr:
                number = 1 + sum(1 for name in repo.branches if name.startswith("refs/pr/"))
                target = f"refs/pr/{number}"
                pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
            else:
                target = revision
            repo.branches[target] = sha
            repo.history.append((target, summary))
            self._json(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}
            )

        # -- routing ---------------------------------------------------------------------------------------------
        def _dispatch(self, *, head: bool) -> None:
            path = urlsplit(self.path).path
            if path == AGENT_REGISTRY:
                # huggingface_hub >= 2.4 fetches this once a day (no token, best effort): the client's own
                # telemetry, not a request of the code under test, so it is answered and not recorded.
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
                return
            hub._record(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if (m := _API_RE.match(path)) and not head:
                self._api(unquote(m["repo"]), m["rev"] or m["tree_rev"], tree=m["tree_rev"] is not None)
            elif m := _RESOLVE_RE.match(path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head=head)
            elif m := _CDN_RE.match(path):
                self._storage(m["oid"], parse_qs(urlsplit(self.path).query).get("link", [""])[0], head=head)
            else:
                self._error(404, "Not Found")

        def _repo_and_commit(self, repo_id: str, revision: str, *, files: bool) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", code="RepoNotFound")
                return None
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token is not None and token not in hub.tokens | hub.write_tokens:
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
                body: object = [hub._tree_entry(name, content) for name, content in sorted(files.items())]
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
                sha256 = hub.digest(content, "sha256")
                headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content))}
            else:
                headers["ETag"] = f'"{hub.digest(content, "git")}"'
            if hub.cdn_links and filename.endswith(LFS_SUFFIXES):
                oid = headers["ETag"].strip('"')
                with hub._lock:
                    hub._cdn[oid] = (repo_id, filename, content)
                    link = f"{hub.url}/lfs-cdn/{oid}?link={hub.link_generation}"
                self._send(302, b"", headers | {"Location": link})
                return
            self._serve(repo_id, filename, content, headers, head=head)

        def _storage(self, oid: str, link: str, *, head: bool) -> None:
            """A storage link handed out by `_resolve`: no token needed, refused once expired."""
            with hub._lock:
                if hub.expire_links_at is not None and len(hub.cdn_gets()) >= hub.expire_links_at:
                    hub.expire_links_at, hub.link_generation = None, hub.link_generation + 1
                found = hub._cdn.get(oid)
                valid = link == str(hub.link_generation)
            if found is None or not valid:
                self._send(403, b"Request has expired", {"Content-Type": "text/plain"})
                return
            repo_id, filename, content = found
            headers = {"ETag": f'"{oid}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            self._serve(repo_id, filename, content, headers, head=head)

        def _serve(self, repo_id: str, filename: str, content: bytes, headers: dict[str, str], *, head: bool) -> None:
            """A file's bytes, whole or the `Range` asked for; dropped midway where the test said so."""
            start, status = 0, 200
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and not head:
                start = int(ranged[1])
                end = int(ranged[2]) if ranged[2] else len(content) - 1
                if start >= len(content):
                    self._error(416, "Range Not Satisfiable", extra={"Content-Range": f"bytes */{len(content)}"})
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                # A view, not a copy: a range of a 1 GB shard is sent straight from the file's bytes.
                content, status = memoryview(content)[start : end + 1], 206
            if head:
                self._send(200, b"", headers, length=len(content))
                return
            if hub.latency_s:
                with hub._lock:
                    hub._waiting += 1
                    hub.most_in_flight = max(hub.most_in_flight, hub._waiting)
                time.sleep(hub.latency_s)
                with hub._lock:
                    hub._waiting -= 1
            cut = hub._next_cut(repo_id, filename)
            if cut is None or cut >= len(content):
                self._send(status, content, headers)
                return
            # Promise the whole body, send part of it, then hang up: what a dropped connection looks like.
            self._send(status, content[:cut], headers, length=len(content))
            self.close_connection = True

        # -- responses -------------------------------------------------------------------------------------------
        def _json(self, status: int, body: object) -> None:
            self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, message: str, *, code: str | None = None, extra: dict[str, str] | None = None):
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
            if code is not None:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _send(
            self, status: int, body: bytes | memoryview, headers: dict[str, str], *, length: int | None = None
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()

    return Handler


def point_client_at(server: FakeHub, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub at `server` with an isolated cache and no token; Xet off (the fake Hub speaks LFS).

    huggingface_hub reads its settings from the environment at import time, so the module constants are patched;
    `HF_HUB_DISABLE_XET` is set too, for subprocesses started by the test.
    """
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    # The client waits 1 s before resuming a dropped download; the only use of `time` in that module.
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda _seconds: None))
    close_session()
