"""A live MemPalace beside us: who holds the palace's writer lease, and the hub we can write through.

Found the way MemPalace 3.11's own CLI finds them (``server_registry.py``):

- the lease is ``mine_palace_lock`` (``palace.lock.lock_path``); its holder writes ``<pid> <argv>``
  into the file from byte 1. A probe takes it non-blocking and lets go at once, and never creates it.
- a hub (``mempalace serve``) records itself in
  ``~/.mempalace/server/<sha256(normcase(realpath))[:24]>/serverinfo.json``; the record counts only
  while its pid is alive. The bearer token is the ``token`` file beside it, then
  ``MEMPALACE_MCP_HTTP_TOKEN``; the second is tried only after a 401.
- a daemon (``mempalace daemon start``) records ``~/.mempalace/daemon/<same key>/endpoint.json``
  (or under ``MEMPALACE_DAEMON_STATE_ROOT``) with its bearer ``token`` beside it.
- a stdio ``mempalace-mcp`` registers nothing: it can be named (from the lock file) but not reached.

Both reachable writers run MemPalace's own write tools: ``HubClient.calls`` sends JSON-RPC
``tools/call`` to the hub's ``POST /mcp`` one after another (the hub takes an exclusive lock per
write, so parallel calls would only queue); ``DaemonClient.calls`` queues ``mcp_tool`` jobs (``POST /jobs``) and
collects their results. Either yields each tool's own JSON answer, in order, as it arrives.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import orjson

from .errors import PalaceEtlError
from .lock import LeaseHolder, lock_path, palace_digest

TOKEN_ENV = "MEMPALACE_MCP_HTTP_TOKEN"
_WILDCARD = {"0.0.0.0", "::", "[::]", ""}
class HubError(PalaceEtlError):
    """The hub or daemon did not answer, or answered with an error for the whole call."""


# MemPalace 3.11's integrity gate (``mcp_server/_guards.py``): refuses every write tool while its
# cached ``PRAGMA quick_check`` verdict on chroma.sqlite3 holds errors; ``mempalace_reconnect`` re-runs it
INTEGRITY_REFUSAL = -32002


class HubRefused(HubError):
    """A JSON-RPC error answer: the server's ``code`` and ``data`` kept for the caller to judge."""

    def __init__(self, message: str, code=None, data=None):
        super().__init__(message)
        self.code = code
        self.data = data if isinstance(data, dict) else {}

    def integrity_errors(self) -> list[str] | None:
        """The quick_check findings behind an integrity-gate refusal; None for any other error."""
        if self.code != INTEGRITY_REFUSAL:
            return None
        return [str(e) for e in self.data.get("errors") or []]


_RERUN = ("start it again and re-run the same command: what it acknowledged is recorded, nothing is "
          "written twice")


def lease_holder(palace: str | os.PathLike) -> LeaseHolder | None:
    """Who holds the palace's writer lease right now, or None when it is free (nothing is created)."""
    path = lock_path(palace)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # no lock file: nobody ever held it
    with os.fdopen(fd, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return LeaseHolder.read(f)
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _key(palace: str | os.PathLike) -> str:
    return palace_digest(palace)[:24]


def server_dir(palace: str | os.PathLike) -> Path:
    return Path.home() / ".mempalace" / "server" / _key(palace)


def _live_record(path: Path) -> dict | None:
    """A MemPalace registration file, while the pid it names is alive."""
    try:
        info = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(info, dict) or not _pid_alive(info.get("pid")) or not isinstance(info.get("port"), int):
        return None
    return info


def _daemon_dir(palace: str | os.PathLike) -> Path:
    return Path(os.environ.get("MEMPALACE_DAEMON_STATE_ROOT") or Path.home() / ".mempalace" / "daemon") / _key(palace)


@dataclass(frozen=True)
class Hub:
    url: str  # the hub's base URL (dialled on loopback for a wildcard bind)
    pid: int
    read_only: bool
    tokens: tuple[str, ...]
    kind = "hub"

    def __str__(self) -> str:
        return f"the MemPalace hub at {self.url} (PID {self.pid})"


@dataclass(frozen=True)
class Daemon:
    url: str
    pid: int
    token: str
    palace: str
    kind = "daemon"
    read_only = False

    def __str__(self) -> str:
        return f"the MemPalace daemon at {self.url} (PID {self.pid})"


def live_daemon(palace: str | os.PathLike) -> Daemon | None:
    """The daemon serving ``palace``, from its ``endpoint.json``, while its pid is alive."""
    where = _daemon_dir(palace)
    info = _live_record(where / "endpoint.json")
    if info is None:
        return None
    try:
        token = (where / "token").read_text(encoding="utf-8").strip()
    except OSError:
        token = ""
    return Daemon(f"http://{info.get('host') or '127.0.0.1'}:{info['port']}", info["pid"], token,
                  str(info.get("palace_path") or palace))


def live_hub(palace: str | os.PathLike) -> Hub | None:
    """The hub serving ``palace``, from its ``serverinfo.json``, while its pid is alive."""
    where = server_dir(palace)
    info = _live_record(where / "serverinfo.json")
    if info is None:
        return None
    host = str(info.get("host") or "").strip()
    host = "127.0.0.1" if host.lower() in _WILDCARD else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    tokens = []
    try:
        tokens.append((where / "token").read_text(encoding="utf-8").strip())
    except OSError:
        pass
    tokens.append(os.environ.get(TOKEN_ENV, "").strip())
    unique = tuple(t for t in dict.fromkeys(tokens) if t)
    return Hub(f"{info.get('scheme') or 'http'}://{host}:{info['port']}", info["pid"], bool(info.get("read_only")),
               unique)


def _send(http: httpx.Client, server, method: str, path: str, body: bytes | None, headers: dict) -> httpx.Response:
    """One request to a hub or daemon; a transport failure is a ``HubError`` saying a re-run is safe."""
    try:
        return http.request(method, f"{server.url}{path}", content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise HubError(f"{server} stopped answering ({type(exc).__name__}: {exc})", hint=_RERUN) from None


class HubClient:
    """JSON-RPC ``tools/call`` to one hub over one keep-alive connection."""

    def __init__(self, hub: Hub, timeout: float = 300.0):
        self.server = hub
        self._http = httpx.Client(timeout=timeout)
        self._ids = itertools.count(1)
        self._token = hub.tokens[0] if hub.tokens else None

    def calls(self, tool: str, arguments: list[dict]) -> Iterator[dict]:
        """The answers to ``tool`` called with each of ``arguments``, one call after another."""
        for args in arguments:
            yield self.call(tool, args)

    def call(self, tool: str, arguments: dict) -> dict:
        """The tool's answer (its JSON text, parsed). A transport failure or a JSON-RPC error raises
        ``HubError``; a tool that answers ``{"success": false, ...}`` is returned for the caller to judge."""
        message = {"jsonrpc": "2.0", "id": next(self._ids), "method": "tools/call",
                   "params": {"name": tool, "arguments": arguments}}
        answer = self._post(orjson.dumps(message))
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {"message": answer["error"]}
            raise HubRefused(f"{self.server}: {tool} failed: {error.get('message', error)}", error.get("code"),
                             error.get("data"))
        try:
            return orjson.loads(answer["result"]["content"][0]["text"])
        except (KeyError, IndexError, TypeError, orjson.JSONDecodeError):
            raise HubError(f"{self.server}: {tool} gave an answer that is not a MemPalace tool result: "
                           f"{str(answer)[:200]}") from None

    def _post(self, body: bytes) -> dict:
        candidates = [self._token] + [t for t in self.server.tokens if t != self._token]
        for n, token in enumerate(candidates):
            headers = {"content-type": "application/json"}
            if token:
                headers["authorization"] = f"Bearer {token}"
            r = _send(self._http, self.server, "POST", "/mcp", body, headers)
            if r.status_code == 401 and n + 1 < len(candidates):
                continue  # the other candidate, as MemPalace's own CLI does: a 401 was refused before dispatch
            if r.status_code != 200:
                raise HubError(f"{self.server} answered HTTP {r.status_code}: {r.text[:200]}",
                               hint=f"set {TOKEN_ENV} to the hub's token" if r.status_code == 401 else None)
            self._token = token
            return orjson.loads(r.content)
        raise AssertionError("unreachable: the last candidate returns or raises")

    def close(self) -> None:
        self._http.close()


class DaemonClient:
    """``mcp_tool`` jobs on one daemon's queue (durable there, retried by it, deduplicated by key)."""

    POLL = 0.05

    def __init__(self, daemon: Daemon, timeout: float = 300.0):
        self.server = daemon
        self._timeout = timeout
        self._http = httpx.Client(timeout=timeout, headers={"authorization": f"Bearer {daemon.token}"})

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        r = _send(self._http, self.server, method, path, None if body is None else orjson.dumps(body),
                  {"content-type": "application/json"})
        if r.status_code not in (200, 202):
            raise HubError(f"{self.server} answered HTTP {r.status_code}: {r.text[:200]}")
        return orjson.loads(r.content)

    def calls(self, tool: str, arguments: list[dict]) -> Iterator[dict]:
        """Queue one job per call, then yield each job's result in order as it finishes."""
        jobs = []
        for args in arguments:
            key = hashlib.sha256(orjson.dumps([tool, args], option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
            payload = {"name": tool, "arguments": args, "palace_path": self.server.palace}
            jobs.append(self._request("POST", "/jobs", {"kind": "mcp_tool", "payload": payload,
                                                        "dedupe_key": f"palace-etl:{key}"})["job"]["id"])
        for job_id in jobs:
            deadline = time.monotonic() + self._timeout
            while (job := self._request("GET", f"/jobs/{job_id}")["job"])["state"] not in ("succeeded", "failed",
                                                                                             "cancelled"):
                if time.monotonic() > deadline:
                    raise HubError(f"{self.server}: job {job_id} ({tool}) still {job['state']} after "
                                   f"{self._timeout:g}s", hint=_RERUN)
                time.sleep(self.POLL)
            yield job["result"] if isinstance(job.get("result"), dict) else \
                {"success": False, "error": job.get("error") or job["state"]}

    def call(self, tool: str, arguments: dict) -> dict:
        return next(self.calls(tool, [arguments]))

    def close(self) -> None:
        self._http.close()
