"""A local stand-in for the Hugging Face Hub API, for upload tests that must not reach huggingface.co.

It implements exactly the endpoints ``huggingface_hub`` 2.4.0 calls for ``HfApi.create_repo``,
``HfApi.upload_folder`` over the LFS *basic* transfer and ``HfApi.list_repo_tree``:

========================================================  ===========================================
``POST /api/repos/create``                                 a model repo with an initial ``.gitattributes``
                                                           commit; 409 when it exists
``POST /api/validate-yaml``                                accepts any README.md metadata
``GET  /api/models/{owner}/{name}[/revision/{rev}]``       repo info (``id``, ``sha``, ``siblings``)
``POST /api/models/{owner}/{name}/preupload/{rev}``        upload mode (``lfs`` for binary or large files,
                                                           else ``regular``) and the current oid per path
``POST /{owner}/{name}.git/info/lfs/objects/batch``        LFS batch: a single-part ``upload`` action and a
                                                           ``verify`` action, none when the object is stored
``PUT  /lfs-objects/{oid}``                                the object's bytes (the "S3" of the stand-in)
``POST /{owner}/{name}.git/info/lfs/objects/verify``       checks the stored object's size and sha256
``POST /api/models/{owner}/{name}/commit/{rev}``           the NDJSON commit (``header``, ``file``,
                                                           ``lfsFile``, ``deletedFile``); a new commit oid
``GET  /api/models/{owner}/{name}/tree/{rev}[/{path}]``    the listing: ``oid`` (git blob id), ``size`` and,
                                                           for LFS files, ``lfs.oid`` (sha256) + ``lfs.size``
``GET  /api/models/{owner}/{name}/xet-write-token/{rev}``  501: the stand-in does not speak Xet
========================================================  ===========================================

Everything is kept in memory. The listing is computed from the bytes the stand-in actually stores, the way
an honest server reports them, so the fault switches below show up as mismatches:

- ``corrupt``: paths whose stored bytes get one byte flipped when they are committed;
- ``drop``: paths left out of the commit (the client is told the commit succeeded);
- ``wrong_listing``: paths whose listing reports a wrong hash (``lfs.oid`` for an LFS file, the blob ``oid``
  for a regular one) while the stored bytes are right.

Xet: with ``hf_xet`` installed, ``huggingface_hub`` 2.4.0 uploads every non-regular file through Xet without
asking the server (``_commit_api.py`` ``_upload_files``: ``if is_xet_available():``; ``hf_api.py``
``upload_folder``: ``if is_xet_available(): … pipelined_upload``). The only switch is ``HF_HUB_DISABLE_XET``,
read once into ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` at import (``utils/_runtime.py``
``is_xet_available``). The ``hub_standin`` fixture sets both, so the LFS basic transfer is used.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from live_server import LiveServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".npy", ".h5", ".msgpack")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MiB in LFS
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its bytes and whether git holds it as an LFS pointer."""

    data: bytes
    lfs: bool

    def entry(self, path: str, wrong: bool) -> dict[str, Any]:
        """The ``/tree`` listing entry, computed from the stored bytes (a wrong hash when ``wrong``)."""
        sha = hashlib.sha256(self.data).hexdigest()
        if not self.lfs:
            return {
                "type": "file",
                "path": path,
                "size": len(self.data),
                "oid": _flip_hex(blob_id(self.data)) if wrong else blob_id(self.data),
            }
        pointer = lfs_pointer(sha, len(self.data))
        return {
            "type": "file",
            "path": path,
            "size": len(self.data),
            "oid": blob_id(pointer),
            "lfs": {
                "oid": _flip_hex(sha) if wrong else sha,
                "size": len(self.data),
                "pointerSize": len(pointer),
            },
        }


@dataclass
class Repo:
    """A model repository: commits as ``oid → {path: StoredFile}``, and the ``main`` branch head."""

    private: bool
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    head: str = ""


def _flip_hex(h: str) -> str:
    return ("1" if h[0] == "0" else "0") + h[1:]


def _flip_byte(data: bytes) -> bytes:
    if not data:
        return b"\x00"
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


class HubStandin:
    """The stand-in's state and its FastAPI app. ``endpoint`` is set once the server runs."""

    def __init__(self) -> None:
        self.endpoint = ""
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS objects by the oid the client announced
        self.corrupt: set[str] = set()
        self.drop: set[str] = set()
        self.wrong_listing: set[str] = set()
        self.requests: list[str] = []  # "METHOD /path" of every request, for assertions
        self.tokens: list[str] = []  # the bearer tokens seen on API calls
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self.app = self._build_app()

    # ---- state helpers ----

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """The files of ``repo_id`` at ``revision`` (a branch name or a commit oid)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.head if revision == "main" else revision]

    def _commit(self, repo: Repo, files: dict[str, StoredFile], summary: str) -> str:
        with self._lock:
            n = next(self._counter)
        digest = hashlib.sha1(
            json.dumps(
                [repo.head, summary, n, sorted((p, blob_id(f.data)) for p, f in files.items())]
            ).encode()
        ).hexdigest()
        repo.commits[digest] = files
        repo.head = digest
        return digest

    @staticmethod
    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"X-Error-Message": message})

    def _repo(self, owner: str, name: str) -> Repo | None:
        return self.repos.get(f"{owner}/{name}")

    def _at(self, repo: Repo, revision: str) -> dict[str, StoredFile] | None:
        return repo.commits.get(repo.head if revision == "main" else revision)

    # ---- the app ----

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            hub.requests.append(f"{request.method} {request.url.path}")
            if request.url.path.startswith("/lfs-objects/"):  # presigned storage URL: no token
                return await call_next(request)
            header = request.headers.get("authorization", "")
            if not header.startswith("Bearer ") or not header[7:]:
                return hub._error(401, "Invalid credentials in Authorization header")
            hub.tokens.append(header[7:])
            return await call_next(request)

        @app.post("/api/repos/create")
        async def create_repo(request: Request) -> Response:
            body = await request.json()
            if body.get("type", "model") != "model":
                return hub._error(400, "the stand-in serves model repos only")
            repo_id = f"{body.get('organization')}/{body['name']}"
            with hub._lock:
                if repo_id in hub.repos:  # the Hub's 409 carries the url: create_repo(exist_ok=True) reads it
                    msg = "You already created this model repo"
                    body = {"error": msg, "url": f"{hub.endpoint}/{repo_id}"}
                    return JSONResponse(body, status_code=409, headers={"X-Error-Message": msg})
                repo = hub.repos[repo_id] = Repo(private=body.get("visibility") == "private")
            hub._commit(repo, {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)}, "initial commit")
            return JSONResponse({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        @app.post("/api/validate-yaml")
        async def validate_yaml() -> Response:
            return JSONResponse({"errors": [], "warnings": []})

        @app.get("/api/models/{owner}/{name}")
        @app.get("/api/models/{owner}/{name}/revision/{revision}")
        async def repo_info(owner: str, name: str, revision: str = "main") -> Response:
            repo = hub._repo(owner, name)
            files = None if repo is None else hub._at(repo, revision)
            if repo is None or files is None:
                return hub._error(404, "Repository not found")
            sha = repo.head if revision == "main" else revision
            siblings = [{"rfilename": p} for p in sorted(files)]
            return JSONResponse(
                {"id": f"{owner}/{name}", "sha": sha, "private": repo.private, "siblings": siblings}
            )

        @app.post("/api/models/{owner}/{name}/preupload/{revision}")
        async def preupload(owner: str, name: str, revision: str, request: Request) -> Response:
            repo = hub._repo(owner, name)
            files = None if repo is None else hub._at(repo, revision)
            if files is None:
                return hub._error(404, "Repository not found")
            out = []
            for f in (await request.json())["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_THRESHOLD or b"\0" in sample
                cur = files.get(f["path"])
                oid = None
                if cur is not None:
                    oid = hashlib.sha256(cur.data).hexdigest() if cur.lfs else blob_id(cur.data)
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return JSONResponse({"files": out})

        @app.post("/{owner}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(owner: str, name: str, request: Request) -> Response:
            if hub._repo(owner, name) is None:
                return hub._error(404, "Repository not found")
            body = await request.json()
            if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
                return hub._error(422, "the stand-in supports the upload operation over the basic transfer")
            objects = []
            for o in body["objects"]:
                obj: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                stored = hub.objects.get(o["oid"])
                if stored is None or hashlib.sha256(stored).hexdigest() != o["oid"]:
                    obj["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-objects/{o['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/{owner}/{name}.git/info/lfs/objects/verify"},
                    }
                objects.append(obj)
            return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        @app.put("/lfs-objects/{oid}")
        async def lfs_put(oid: str, request: Request) -> Response:
            hub.objects[oid] = await request.body()
            return Response(status_code=200)

        @app.post("/{owner}/{name}.git/info/lfs/objects/verify")
        async def lfs_verify(owner: str, name: str, request: Request) -> Response:
            body = await request.json()
            stored = hub.objects.get(body["oid"])
            if (
                stored is None
                or len(stored) != body["size"]
                or hashlib.sha256(stored).hexdigest() != body["oid"]
            ):
                return hub._error(422, f"LFS object {body['oid']} is missing or does not match its oid")
            return JSONResponse({"message": "ok"})

        @app.post("/api/models/{owner}/{name}/commit/{revision}")
        async def commit(owner: str, name: str, revision: str, request: Request) -> Response:
            repo = hub._repo(owner, name)
            if repo is None:
                return hub._error(404, "Repository not found")
            if revision != "main":
                return hub._error(400, "the stand-in commits to main only")
            if "x-ndjson" not in request.headers.get("content-type", ""):
                return hub._error(400, "expected application/x-ndjson")
            files = dict(repo.commits[repo.head])
            summary = ""
            for line in (await request.body()).splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    continue
                path = value["path"]
                if key in ("deletedFile", "deletedFolder"):
                    for p in [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]:
                        del files[p]
                    continue
                if key == "file":
                    data, lfs = base64.b64decode(value["content"]), False
                elif key == "lfsFile":
                    stored = hub.objects.get(value["oid"])
                    if stored is None:
                        return hub._error(422, f"{path}: LFS object {value['oid']} was never uploaded")
                    data, lfs = stored, True
                else:
                    return hub._error(400, f"unsupported commit operation {key!r}")
                if path in hub.drop:
                    continue
                files[path] = StoredFile(_flip_byte(data) if path in hub.corrupt else data, lfs)
            oid = hub._commit(repo, files, summary)
            return JSONResponse(
                {
                    "commitUrl": f"{hub.endpoint}/{owner}/{name}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                }
            )

        @app.get("/api/models/{owner}/{name}/tree/{revision}")
        @app.get("/api/models/{owner}/{name}/tree/{revision}/{path:path}")
        async def tree(owner: str, name: str, revision: str, request: Request, path: str = "") -> Response:
            repo = hub._repo(owner, name)
            files = None if repo is None else hub._at(repo, revision)
            if files is None:
                return hub._error(404, "Repository or revision not found")
            recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            entries: dict[str, dict[str, Any]] = {}
            for p in sorted(files):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :]
                parts = rest.split("/")
                for i in range(1, len(parts)):  # the folders on the way
                    folder = prefix + "/".join(parts[:i])
                    if recursive or i == 1:
                        entries.setdefault(
                            folder,
                            {"type": "directory", "path": folder, "oid": blob_id(folder.encode()), "size": 0},
                        )
                if recursive or len(parts) == 1:
                    entries[p] = files[p].entry(p, p in hub.wrong_listing)
            return JSONResponse(list(entries.values()))

        @app.get("/api/models/{owner}/{name}/xet-write-token/{revision}")
        @app.get("/api/models/{owner}/{name}/xet-read-token/{revision}")
        async def xet_token(owner: str, name: str, revision: str) -> Response:
            return hub._error(501, "this Hub stand-in does not implement Xet; set HF_HUB_DISABLE_XET=1")

        return app


@pytest.fixture(name="hub_standin")
def hub_standin_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    """A fresh :class:`HubStandin` served on 127.0.0.1; ``huggingface_hub`` online, LFS instead of Xet."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # for subprocesses
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read once, at import
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # a call that forgets the stand-in's endpoint must fail here (nothing listens on port 9), never
    # reach huggingface.co: HfApi(endpoint=None) and the module-level helpers fall back to this
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    hub = HubStandin()
    with LiveServer(hub.app) as server:
        hub.endpoint = server.url
        yield hub


__all__ = ["HubStandin", "StoredFile", "blob_id", "hub_standin_fixture", "lfs_pointer"]
