"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, enough for huggingface_hub's
``snapshot_download``: repository info, the file tree, and file downloads (HEAD and GET).

``repos`` maps ``org/name`` to ``{path in the repository: local file}``; any other repository
is a 404 with the hub's ``X-Error-Code: RepoNotFound``, as the hub answers one.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubMock:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.requests: list[str] = []
        self.tokens: list[str | None] = []          # each request's Authorization header
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ---- routes --------------------------------------------------------------------------
    def _answer(self, h, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        self.tokens.append(h.headers.get("Authorization"))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if repo not in self.repos:
                return self._missing(h, body)
            if kind == "revision":
                return self._json(h, body, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                            "siblings": [{"rfilename": f} for f in self.repos[repo]]})
            if kind == "tree":
                return self._json(h, body, [self._entry(repo, f) for f in self.repos[repo]])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.repos.get(repo)
            if files is None:
                return self._missing(h, body)
            if name not in files:
                return self._send(h, 404, body, b"{}", {"X-Error-Code": "EntryNotFound"})
            data = Path(files[name]).read_bytes()
            return self._send(h, 200, body, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha1(data)}"',
                                                    "Content-Type": "application/octet-stream"})
        self._send(h, 404, body, b"{}", {})

    def _entry(self, repo: str, name: str) -> dict:
        data = Path(self.repos[repo][name]).read_bytes()
        return {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}

    def _missing(self, h, body: bool) -> None:
        self._send(h, 404, body, json.dumps({"error": "Repository not found"}).encode(),
                   {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

    def _json(self, h, body: bool, value) -> None:
        self._send(h, 200, body, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(h, status: int, body: bool, data: bytes, headers: dict) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


def _sha1(data: bytes) -> str:
    # the hub's ETag of a file kept in git (not LFS) is its git blob id; any stable hash serves here
    return hashlib.sha1(data).hexdigest()
