"""Queued requests kept in an fsspec root, so that an ingress restart loses none of them.

Layout under `<root>/<app>/` (one app's queue never mixes with another's):

    requests/<id>/request.json   what was submitted (written once, before the 202)
    requests/<id>/status.json    queued, running, completed, failed or cancelled
    requests/<id>/lease.json     the ingress replica running it, until `expires_at`
    requests/<id>/result         the media of a completed request
    pending/<deployment>/<submitted ns>-<id>   one marker per unfinished request, in order

A request is claimed by writing its lease and reading it back a moment later: of replicas that
claim at once, the last writer wins and the others see its token. The owner renews the lease
while the request runs; one whose lease lapsed (its replica stopped) is claimed again. A
request is finished once its status says so, whoever claims it next: it never runs twice to
completion.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

from deployments.errors import NotFound
from deployments.storage import shared_root

REQUEST_ID = re.compile(r"^q-[0-9a-f]{32}$")
TERMINAL = ("completed", "failed", "cancelled")
# How long a claim waits before reading its lease back: longer than a write takes, so a
# replica that claimed at the same moment has written its own lease by then.
CLAIM_SETTLE_S = 0.1


def new_request_id() -> str:
    return f"q-{uuid.uuid4().hex}"


class QueueStore:
    """One app's queued requests in `root` (blocking I/O: call it off the event loop)."""

    def __init__(self, root: str, app_name: str):
        self.fs, path = shared_root(root)
        self.root = posixpath.join(path.rstrip("/") or "/", app_name)

    # Paths

    def _folder(self, request_id: str) -> str:
        if not REQUEST_ID.match(request_id):
            raise NotFound(f"request_id: no queued request {request_id}")
        return posixpath.join(self.root, "requests", request_id)

    def _pending(self, deployment: str) -> str:
        return posixpath.join(self.root, "pending", deployment)

    def _marker(self, request: dict) -> str:
        name = f"{request['submitted_ns']:020d}-{request['request_id']}"
        return posixpath.join(self._pending(request["deployment"]), name)

    # Small files, written whole

    def _write(self, path: str, data: bytes) -> None:
        """A reader sees the old file or the new one, never a part: on a local disk through a
        rename; an object store's put is whole by itself."""
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            self.fs.pipe_file(partial, data)
            self.fs.mv(partial, path)
        else:
            self.fs.pipe_file(path, data)

    def _read_json(self, path: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def _write_json(self, path: str, value: dict) -> None:
        self._write(path, json.dumps(value).encode())

    def _remove(self, path: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    # Requests

    def submit(self, request: dict) -> None:
        """Keep a new request (request_id, deployment, submitted_ns, ...) as queued."""
        folder = self._folder(request["request_id"])
        self._write_json(posixpath.join(folder, "request.json"), request)
        self._write_json(posixpath.join(folder, "status.json"), {"status": "queued"})
        self._write(self._marker(request), b"")

    def request(self, request_id: str) -> dict:
        found = self._read_json(posixpath.join(self._folder(request_id), "request.json"))
        if found is None:
            raise NotFound(f"request_id: no queued request {request_id}")
        return found

    def status(self, request_id: str) -> dict:
        found = self._read_json(posixpath.join(self._folder(request_id), "status.json"))
        if found is None:
            raise NotFound(f"request_id: no queued request {request_id}")
        return found

    def set_status(self, request_id: str, status: dict) -> None:
        self._write_json(posixpath.join(self._folder(request_id), "status.json"), status)

    def pending(self, deployment: str) -> list[tuple[str, str]]:
        """(marker path, request id) of the deployment's unfinished requests, oldest first."""
        try:
            paths = self.fs.ls(self._pending(deployment), detail=False)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(path) for path in paths)
        return [
            (posixpath.join(self._pending(deployment), name), name.split("-", 1)[1])
            for name in names
            if "-" in name and not name.endswith(".partial")
        ]

    def drop_marker(self, marker: str) -> None:
        """A marker whose request is gone (removed by retention, or written half)."""
        self._remove(marker)

    def finish(self, request: dict) -> None:
        """The request left its queue: its marker and lease go."""
        self._remove(self._marker(request))
        self._remove(posixpath.join(self._folder(request["request_id"]), "lease.json"))

    def write_result(self, request_id: str, content: bytes) -> None:
        self._write(posixpath.join(self._folder(request_id), "result"), content)

    def result(self, request_id: str) -> bytes:
        try:
            return self.fs.cat_file(posixpath.join(self._folder(request_id), "result"))
        except FileNotFoundError as e:
            raise NotFound(f"request_id: no result for {request_id}") from e

    # Leases

    def claim(self, request_id: str, owner: str, lease_s: float) -> bool:
        """Whether this owner now holds the request's lease (none was live, or it was ours)."""
        lease_path = posixpath.join(self._folder(request_id), "lease.json")
        lease = self._read_json(lease_path)
        if lease and lease["owner"] != owner and lease["expires_at"] > time.time():
            return False
        token = uuid.uuid4().hex
        self._write_json(
            lease_path, {"owner": owner, "token": token, "expires_at": time.time() + lease_s}
        )
        time.sleep(CLAIM_SETTLE_S)
        lease = self._read_json(lease_path)
        return lease is not None and lease["token"] == token

    def renew(self, request_id: str, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when another replica took the request meanwhile."""
        lease_path = posixpath.join(self._folder(request_id), "lease.json")
        lease = self._read_json(lease_path)
        if lease is None or lease["owner"] != owner:
            return False
        self._write_json(lease_path, {**lease, "expires_at": time.time() + lease_s})
        return True

    # Retention

    def remove_expired(self, retention_s: float) -> int:
        """Remove requests finished more than `retention_s` ago; how many went."""
        try:
            folders = self.fs.ls(posixpath.join(self.root, "requests"), detail=False)
        except FileNotFoundError:
            return 0
        removed = 0
        for folder in folders:
            status = self._read_json(posixpath.join(folder, "status.json"))
            finished_at = (status or {}).get("finished_at")
            if finished_at is not None and finished_at + retention_s < time.time():
                self._remove(folder, recursive=True)
                removed += 1
        return removed
