"""A client for snapbackd, the snapback checkpoint daemon, in plain Python.

It speaks the daemon's socket protocol (newline-delimited JSON over a Unix
socket, see docs/reference/protocol.md) with the standard library only::

    import snapback

    with snapback.connect() as sb:
        cp = sb.checkpoint("my-sandbox", plan="run-42", tool="Bash", phase="pre")
        ...
        report = sb.rollback(cp["id"])
        print(report["restored"], report["created"], report["deleted"])

Answers are the daemon's JSON documents as dicts. Paths travel as
``{"text": ...}`` or ``{"bytes": <base64>}``; :func:`path_bytes` turns one
into ``bytes``. A refusal raises :class:`SnapbackError` carrying the
protocol's error ``code`` (``not_found``, ``plan_applied``, ``conflict``,
...); a daemon that cannot be reached raises :class:`DaemonUnreachable`.
"""

from __future__ import annotations

import base64
import json
import os
import socket as _socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

#: A path as the standard library takes one.
PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: An answer of the daemon: its JSON document.
Answer = Dict[str, Any]

__all__ = [
    "PROTOCOL",
    "Answer",
    "PathLike",
    "Client",
    "DaemonUnreachable",
    "SnapbackError",
    "connect",
    "default_socket",
    "path_bytes",
    "wire_path",
]

#: The protocol number this client speaks. Protocol 2 sends an answer
#: longer than one line as ``part`` lines, then the answer (see ``_call``).
PROTOCOL = 2

#: The longest line either side sends, newline included.
MAX_LINE = 1 << 20


class SnapbackError(Exception):
    """The daemon refused a request, or the exchange failed.

    ``code`` is the protocol's stable error code; ``paths`` lists the paths
    the error is about (a revert's conflicts) as bytes; ``hint``, when the
    daemon gives one, says what the user may do about it.
    """

    def __init__(self, code: str, message: str, paths: Iterable[bytes] = (), hint: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.paths = list(paths)
        self.hint = hint

    def __str__(self):
        return "%s: %s" % (self.code, self.message)


class DaemonUnreachable(SnapbackError):
    """Nothing answers on the socket: the daemon is not running there."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(
            "unreachable",
            "cannot reach snapbackd at %s (%s); start it with `snapbackd`" % (path, error),
        )
        self.path = path


def default_socket() -> str:
    """Returns the socket the daemon uses by default, as the CLI finds it:
    ``$SNAPBACK_SOCKET``, then ``$XDG_RUNTIME_DIR/snapback/snapbackd.sock``,
    then ``/run/snapback/snapbackd.sock`` for root."""
    if os.environ.get("SNAPBACK_SOCKET"):
        return os.environ["SNAPBACK_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "snapback", "snapbackd.sock")
    if os.geteuid() == 0:
        return "/run/snapback/snapbackd.sock"
    raise SnapbackError("invalid_request", "no socket path: pass one, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR")


def wire_path(path: PathLike) -> Dict[str, str]:
    """Encodes a path (str, bytes or os.PathLike) for the wire."""
    raw = os.fsencode(path)
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"bytes": base64.b64encode(raw).decode("ascii")}


def path_bytes(wire: Dict[str, str]) -> bytes:
    """Decodes a path the daemon sent into bytes."""
    if "text" in wire:
        return wire["text"].encode("utf-8")
    return base64.b64decode(wire["bytes"])


def connect(path: Optional[PathLike] = None, timeout: Optional[float] = None) -> "Client":
    """Connects to the daemon at ``path`` (default: :func:`default_socket`)
    and exchanges hello / welcome. ``timeout`` (seconds) bounds each
    answer; ``None`` waits as long as the daemon works."""
    return Client(path or default_socket(), timeout)


class Client:
    """A connection to snapbackd. One request at a time; close it, or use
    it as a context manager."""

    def __init__(self, path: PathLike, timeout: Optional[float] = None):
        self.path = os.fsdecode(path)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise DaemonUnreachable(self.path, e) from e
        self._sock = sock
        self._reader = sock.makefile("rb")
        welcome = self._call({"type": "hello", "protocol": PROTOCOL, "client": "snapback-python"})
        if welcome.get("type") != "welcome" or welcome.get("protocol") != PROTOCOL:
            self.close()
            raise SnapbackError("protocol_mismatch", "unexpected welcome: %r" % (welcome,))
        #: The daemon's name and version.
        self.daemon = welcome.get("daemon")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, request: Answer, on_part: Optional[Callable[[str, List[Any]], None]] = None) -> Answer:
        """Sends ``request`` and returns the answer. An answer too long for
        one line comes as ``part`` lines (``{"field": ..., "items": [...]}``)
        before it: they are appended, in order, to the answer's lists; or,
        with ``on_part``, each is handed to ``on_part(field, items)`` as it
        arrives and not kept."""
        line = json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n"
        if len(line) > MAX_LINE:
            raise SnapbackError("invalid_request", "request longer than %d bytes" % MAX_LINE)
        self._sock.sendall(line)
        parts = []
        while True:
            answer = self._reader.readline(MAX_LINE + 1)
            if not answer.endswith(b"\n"):
                raise SnapbackError("io", "the daemon closed the connection")
            response = json.loads(answer)
            kind = response.get("type")
            if kind == "progress":
                continue  # only sent to clients that ask; skipped all the same
            if kind == "part":
                if on_part is not None:
                    on_part(response["field"], response["items"])
                else:
                    parts.append(response)
                continue
            if kind == "error":
                paths = [path_bytes(p) for p in response.get("paths", [])]
                raise SnapbackError(response.get("code", "unknown"), response.get("message", ""), paths,
                                    response.get("hint"))
            for part in parts:
                # A list left empty in the answer may be left out of it.
                response.setdefault(part["field"], []).extend(part["items"])
            return response

    def _expect(self, request: Answer, kind: str,
                on_part: Optional[Callable[[str, List[Any]], None]] = None) -> Answer:
        response = self._call(request, on_part)
        if response.get("type") != kind:
            raise SnapbackError("internal", "expected %s, got %r" % (kind, response.get("type")))
        del response["type"]
        return response

    # Sandboxes.

    def sandbox_add(self, path: PathLike, name: Optional[str] = None, excludes: Iterable[str] = (),
                    store: Optional[PathLike] = None) -> Answer:
        """Registers a directory; returns the sandbox."""
        # The daemon follows no symlink: resolve this user's own here.
        request = {"type": "sandbox_add", "path": wire_path(os.path.realpath(path)), "name": name,
                   "excludes": list(excludes)}
        if store is not None:
            request["store"] = wire_path(os.path.realpath(store))
        return self._expect(request, "sandbox")

    def sandbox_list(self) -> List[Answer]:
        """Returns the sandboxes this user may use."""
        return self._expect({"type": "sandbox_list"}, "sandboxes")["sandboxes"]

    def sandbox_remove(self, sandbox: str, purge: bool = False) -> Answer:
        """Unregisters a sandbox (its directory is never touched); with
        ``purge``, also deletes its checkpoints and their stored files."""
        return self._expect({"type": "sandbox_remove", "sandbox": os.fspath(sandbox), "purge": purge}, "sandbox")

    # Checkpoints.

    def checkpoint(self, sandbox: str, plan: Optional[str] = None, reason: Optional[str] = None,
                   tool: Optional[str] = None, phase: Optional[str] = None,
                   labels: Optional[Dict[str, str]] = None, pin: bool = False) -> Answer:
        """Takes a checkpoint of ``sandbox`` (a name or registered path)."""
        return self._expect({
            "type": "checkpoint", "sandbox": os.fspath(sandbox), "plan": plan, "reason": reason,
            "tool": tool, "phase": phase, "labels": dict(labels or {}), "pin": pin,
        }, "checkpoint")

    def list(self, sandbox: Optional[str] = None, plan: Optional[str] = None) -> List[Answer]:
        """Returns checkpoints, oldest first, optionally of one sandbox or plan."""
        return self._expect({"type": "list", "sandbox": sandbox, "plan": plan}, "checkpoints")["checkpoints"]

    def show(self, checkpoint: str) -> Answer:
        """Returns one checkpoint (an id or a unique prefix of one)."""
        return self._expect({"type": "show", "checkpoint": checkpoint}, "checkpoint")

    def diff(self, from_checkpoint: str, to_checkpoint: Optional[str] = None,
             on_change: Optional[Callable[[Answer], None]] = None, *, stat: bool = False, patch: bool = False,
             paths: Iterable[PathLike] = (), on_patch: Optional[Callable[[bytes], None]] = None,
             step: bool = False) -> Answer:
        """Returns the changes from one checkpoint to another, or to the
        live tree when ``to_checkpoint`` is None; only below ``paths`` when
        given. With ``stat``, each file's change carries a ``stat`` (its
        ``added`` and ``removed`` lines) and the report a ``total``. With
        ``patch``, also the patch, in git's format: the report's ``patch``
        is its bytes. With ``step``, the changes ``from_checkpoint``
        recorded against its parent (``to_checkpoint`` must be None).

        With ``on_change`` (and ``on_patch``), each change (each piece of
        the patch, as bytes) is handed to it as it arrives instead, and the
        report holds none: a diff of any size in bounded memory."""
        detail = "patch" if patch else "stat" if stat else "paths"
        request = {"type": "diff", "from": from_checkpoint, "to": to_checkpoint, "detail": detail,
                   "paths": [wire_path(p) for p in paths], "step": step}
        if on_change is None and on_patch is None:
            report = self._expect(request, "diff")
            report["patch"] = b"".join(path_bytes(piece) for piece in report.get("patch", []))
            return report
        sinks = {"changes": on_change or (lambda _: None),
                 "patch": lambda piece: (on_patch or (lambda _: None))(path_bytes(piece))}

        def each(field: str, items: List[Any]) -> None:
            for item in items:
                sinks[field](item)

        report = self._expect(request, "diff", each)
        for field in ("changes", "patch"):
            for item in report.get(field, []):
                sinks[field](item)
            report[field] = [] if field == "changes" else b""
        return report

    def step(self, checkpoint: str, stat: bool = True, patch: bool = False, paths: Iterable[PathLike] = ()) -> Answer:
        """What ``checkpoint`` changed against its parent, with line counts
        (and the patch): ``snapback show CHECKPOINT --stat``."""
        return self.diff(checkpoint, stat=stat, patch=patch, paths=paths, step=True)

    def log(self, sandbox: Optional[str] = None, plan: Optional[str] = None, limit: Optional[int] = None,
            stat: bool = False) -> Answer:
        """The timeline, newest first: ``entries`` (each a ``checkpoint``,
        its step's ``total`` lines, the ``pre`` checkpoint of the same tool
        call, the ``restore`` a daemon checkpoint belongs to; with
        ``stat``, its ``changes``) and ``more``, the entries past
        ``limit`` (20 when None; 0 for all)."""
        return self._expect({"type": "log", "sandbox": sandbox, "plan": plan, "limit": limit, "stat": stat},
                            "log")

    def rollback(self, checkpoint: str, paths: Iterable[PathLike] = (), dry_run: bool = False) -> Answer:
        """Brings the sandbox back to ``checkpoint`` (only ``paths`` when
        given); returns counts (``restored``, ``created``, ``deleted``,
        ``unchanged``) and the ``changed`` paths."""
        return self._expect({"type": "rollback", "checkpoint": checkpoint,
                             "paths": [wire_path(p) for p in paths], "dry_run": dry_run}, "rollback")

    def revert(self, checkpoint: str, force: bool = False, dry_run: bool = False) -> Answer:
        """Undoes only the changes ``checkpoint`` recorded, keeping later
        ones. A dry run changes nothing and reports, in ``preview``, each
        path it would change with its line counts."""
        return self._expect({"type": "revert", "checkpoint": checkpoint, "force": force, "dry_run": dry_run},
                            "rollback")

    def undo(self, sandbox: str, dry_run: bool = False) -> Answer:
        """Undoes the latest rollback, revert or undo of ``sandbox``."""
        return self._expect({"type": "undo", "sandbox": sandbox, "dry_run": dry_run}, "rollback")

    # Plans.

    def plan_show(self, plan: str) -> Answer:
        return self._expect({"type": "plan_show", "plan": plan}, "plan")

    def plan_apply(self, plan: str) -> Answer:
        """Marks ``plan`` applied: from then on it cannot be rolled back."""
        return self._expect({"type": "plan_apply", "plan": plan}, "plan")

    def plan_abandon(self, plan: str) -> Answer:
        return self._expect({"type": "plan_abandon", "plan": plan}, "plan")

    def plan_rollback(self, plan: str, checkpoint: str, paths: Iterable[PathLike] = (),
                      dry_run: bool = False) -> Answer:
        """Rolls back to one of ``plan``'s checkpoints; refused with code
        ``plan_applied`` once the plan is applied."""
        return self._expect({"type": "plan_rollback", "plan": plan, "checkpoint": checkpoint,
                             "paths": [wire_path(p) for p in paths], "dry_run": dry_run}, "rollback")

    # The daemon.

    # Retention and exports.

    def prune(self, sandbox: str, keep_last: Optional[int] = None, keep_within_secs: Optional[int] = None) -> Answer:
        """Prunes ``sandbox``'s checkpoints now under its retention policy,
        keeping ``keep_last`` newest and every one younger than
        ``keep_within_secs`` when given."""
        return self._expect({"type": "prune", "sandbox": sandbox, "keep_last": keep_last,
                             "keep_within_secs": keep_within_secs}, "pruned")

    def export(self, checkpoint: str, directory: PathLike) -> Answer:
        """Writes ``checkpoint`` out as a read-only tree in ``directory``,
        which must not exist yet (its parent is resolved here)."""
        target = os.fsencode(directory)
        parent, name = os.path.split(os.path.abspath(target))
        return self._expect({"type": "export", "checkpoint": checkpoint,
                             "dir": wire_path(os.path.join(os.path.realpath(parent), name))}, "exported")

    # The daemon.

    def status(self) -> Answer:
        """The daemon and each sandbox this user may use."""
        return self._expect({"type": "status"}, "status")

    def verify(self) -> Answer:
        """Checks every stored object against the catalogue; reports, never repairs."""
        return self._expect({"type": "verify"}, "verified")
