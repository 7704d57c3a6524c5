"""The Ray actor of `spyglass launch` (trainer/launch.py): one subprocess (a server or a trainer
rank) in its own process group, its output lines handed to the launcher, and the per-node check
that the run's shared directories are seen there.

Test: .venv/bin/python -m pytest -q tests/test_launch.py
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any


def _libc_prctl() -> Any:
    """libc's prctl, resolved here in the parent: loading a library in the child of a fork of a
    multithreaded process (a Ray worker) can deadlock on a lock another thread held at the fork.
    None where there is no libc.so.6 (not Linux)."""
    try:
        fn = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong], ctypes.c_int
    return fn


def _die_with_parent(prctl: Any) -> Any:
    """A preexec_fn: the child gets SIGKILL when the actor process that started it dies
    (PR_SET_PDEATHSIG); it only calls the already resolved `prctl`."""
    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        if prctl is not None:
            prctl(1, int(signal.SIGKILL), 0, 0, 0)
    return preexec


def shared_path_problem(files: dict[str, str], where: str) -> str | None:
    """None when every nonce file (path -> its content) reads back as written on this node;
    else one line naming the node (`where`) and the first path it does not see."""
    for path, nonce in files.items():
        try:
            why = "" if Path(path).read_text(encoding="utf-8") == nonce else "it holds other content"
        except OSError as e:
            why = e.strerror or type(e).__name__
        if why:
            return (f"{where} cannot read {path}, which the launcher wrote ({why}): "
                    f"log_dir/ckpt_dir must be on a filesystem every node shares")
    return None


class ProcessActor:
    """A Ray actor that runs one subprocess (a server or a trainer rank) in its own process group
    and hands its output lines to the launcher; made remote with `ray.remote` at launch time."""

    def __init__(self, name: str) -> None:
        self.name, self.proc = name, None
        self.prctl = _libc_prctl()
        self.lines: collections.deque[str] = collections.deque(maxlen=100_000)
        self.last = ""

    def __repr__(self) -> str:  # Ray's prefix for anything the actor itself prints
        return self.name

    def where(self) -> dict[str, Any]:
        import ray  # noqa: PLC0415
        return {"ip": ray.util.get_node_ip_address(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": sorted((str(g) for g in ray.get_gpu_ids()), key=_gpu_key), "python": sys.executable,
                "pid": os.getpid()}

    def free_port(self, host: str, candidates: list[int]) -> int:
        """The first of `candidates` free on `host` ([]: any free port)."""
        for port in candidates or [0]:
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return int(sock.getsockname()[1])
        raise RuntimeError(f"{self.name}: none of ports {candidates[0]}..{candidates[-1]} is free on {host}")

    def start(self, argv: list[str], env: dict[str, str], cwd: str) -> int:
        bindir = os.path.dirname(sys.executable)  # the node's spyglass environment comes first on PATH
        full = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(argv, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent(self.prctl))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self.proc.pid

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def poll(self) -> tuple[list[str], int | None, str]:
        """(new output lines, exit status or None while running, the last line ever seen)."""
        rc = self.proc.poll() if self.proc is not None else None
        if rc is not None:
            self.reader.join(5)  # what the pipe still holds (unless a grandchild keeps it open)
        out = [self.lines.popleft() for _ in range(len(self.lines))]
        self.last = next((x for x in reversed(out) if x.strip()), self.last)
        return out, rc, self.last

    def sees(self, files: dict[str, str], where: str) -> str | None:
        """shared_path_problem on this actor's node."""
        return shared_path_problem(files, where)

    def healthy(self, url: str) -> bool:
        try:  # directly, never through an http_proxy of the node's environment
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the process group, SIGKILL after grace_s (and to anything left in the group)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait()


def _gpu_key(g: str) -> tuple[int, int, str]:
    """GPU ids in numeric order (Ray reports them as strings; a UUID sorts after the numbers)."""
    return (0, int(g), "") if g.isdigit() else (1, 0, g)
