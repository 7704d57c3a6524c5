"""The Python tool: run model-written code in a subprocess sandbox and return its output.

Each call runs `python -I -c <bootstrap>` in a fresh scratch directory (its cwd, HOME and
TMPDIR), in its own session/process group, with a minimal environment and:
  * resource limits set in preexec: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC, RLIMIT_FSIZE,
    RLIMIT_NOFILE, RLIMIT_CORE=0;
  * a wall-clock timeout, after which the whole process group is SIGKILLed (the group is also
    killed when the code ends, so nothing it started outlives the call);
  * an audit hook (sys.addaudithook, installed by the bootstrap before the user's code runs)
    that refuses: socket creation and name resolution; opening files for reading outside the
    scratch dir and Python's own stdlib/site-packages; writing, deleting, renaming, chmod-ing
    anything outside the scratch dir; listing directories outside those roots; fork, exec,
    spawn, subprocess, os.system, and signalling other processes;
  * a network namespace of its own (`unshare -n`, or `unshare -r -n` when not root) when the
    `unshare` binary works here (`netns="auto"`, probed once): inside, there is no interface
    but a down loopback, so even code that gets past the audit hook has no network;
  * stdout/stderr captured up to `max_capture_bytes` each (beyond that the run is killed) and
    shown truncated (head and tail) to `max_output_chars` each.

The audit hook is defence in depth against mistakes, not a security boundary against hostile
code (ctypes can bypass it); the namespace, the rlimits and the process-group kill are the
hard limits. RLIMIT_NPROC counts every process of the real user and is not enforced for root;
the hook's fork ban is what stops fork bombs there.

Outcomes: exit status 0 or an ordinary exception in the user's code -> a normal result (the
model reads its traceback; meta["exit_code"] says which). A sandbox refusal -> bad_args
("sandbox: ..."); wall-clock timeout, CPU limit, memory limit, file-size limit, output flood or
death by a signal -> fatal. Nothing raises.

    tool = python_tool(PythonConfig(timeout_s=10))
    res = await tool.fn({"code": "print(6*7)"}, ToolContext())   # res.text -> "42\n[exit status 0]"
"""
from __future__ import annotations

import asyncio
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spyglass.engine.tools.args import check_args
from spyglass.engine.tools.base import ErrorKind, Tool, ToolContext, ToolError, ToolResult

EXIT_VIOLATION = 86  # the bootstrap's exit status when a sandbox refusal went uncaught
EXIT_MEMORY = 87     # ... when MemoryError went uncaught
EXIT_FSIZE = 88      # ... when a write failed with EFBIG (RLIMIT_FSIZE)

# Runs before the user's code: computes the allowed roots, installs the audit hook, then execs
# main.py from the scratch dir (so tracebacks show the user's lines).
_BOOTSTRAP = r'''
import os, sys, sysconfig, traceback
_realpath, _fspath, _isinstance, _str, _bytes = os.path.realpath, os.fspath, isinstance, str, bytes
SCRATCH = _realpath(os.getcwd())
_paths = sysconfig.get_paths()
READ = tuple(sorted({_realpath(p) for p in (_paths["stdlib"], _paths["platstdlib"],
        _paths["purelib"], _paths["platlib"], *[q for q in sys.path if q.endswith(".zip")])}))
READ_FILES = ("/dev/null", "/dev/urandom", "/dev/zero")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
class SandboxViolation(PermissionError):
    pass
def _under(p, roots):
    return any(p == r or p.startswith(r + "/") for r in roots)
def _resolve(path):
    if _isinstance(path, int):
        return None
    p = _fspath(path)
    if _isinstance(p, _bytes):
        p = os.fsdecode(p)
    return _realpath(p)
def _check_read(event, path):
    p = _resolve(path)
    if p is not None and not (_under(p, (SCRATCH,) + READ) or p in READ_FILES):
        raise SandboxViolation(f"sandbox: {event} of {p!r} is outside the scratch directory")
def _check_write(event, path):
    p = _resolve(path)
    if p is not None and not _under(p, (SCRATCH,)) and p != "/dev/null":
        raise SandboxViolation(f"sandbox: {event} of {p!r} is outside the scratch directory")
BANNED = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
          "subprocess.Popen", "pty.spawn", "os.startfile"}
NET = {"socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
       "socket.gethostbyaddr", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
WRITES = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
          "os.utime", "os.link", "os.symlink", "os.chflags", "os.lchown", "os.setxattr",
          "os.removexattr", "shutil.rmtree", "shutil.chown"}
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            _check_write("writing", path)
        else:
            _check_read("reading", path)
    elif event in NET:
        raise SandboxViolation(f"sandbox: network access ({event}) is not allowed")
    elif event in BANNED:
        raise SandboxViolation(f"sandbox: starting processes ({event}) is not allowed")
    elif event in WRITES:
        _check_write(event, args[0])
    elif event == "os.rename":
        _check_write(event, args[0]); _check_write(event, args[1])
    elif event in ("os.listdir", "os.scandir"):
        _check_read(event, args[0] if args[0] is not None else ".")
    elif event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid()):
        raise SandboxViolation(f"sandbox: signalling other processes ({event}) is not allowed")
def _chain(e):
    for _ in range(64):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__
MAIN = os.path.join(SCRATCH, "main.py")
with open(MAIN, encoding="utf-8") as f:
    SRC = f.read()
sys.argv = [MAIN]
sys.path[:0] = [SCRATCH]
sys.addaudithook(_hook)
_g = {"__name__": "__main__", "__file__": MAIN, "__builtins__": __builtins__}
try:
    exec(compile(SRC, MAIN, "exec"), _g)
except SystemExit:
    raise
except BaseException as e:
    if _isinstance(e, MemoryError):
        _msg, _rc = "MemoryError: the code ran out of memory\n", 87
    elif _isinstance(e, OSError) and e.errno == 27:  # EFBIG (RLIMIT_FSIZE; SIGXFSZ is ignored)
        _msg, _rc = f"OSError: {e}\n", 88
    else:  # the traceback without the bootstrap's own frames
        _msg = "".join(x for x in traceback.format_exception(e)
                       if not x.startswith('  File "<string>"'))
        _rc = 86 if any(_isinstance(x, SandboxViolation) for x in _chain(e)) else 1
    sys.stderr.write(_msg)
    sys.stderr.flush(); sys.stdout.flush(); os._exit(_rc)
'''


@dataclass
class PythonConfig:
    """Limits of the Python sandbox (see the module docstring)."""

    python: str = sys.executable
    timeout_s: float = 10.0          # wall clock, then the process group is killed
    cpu_s: int = 10                  # RLIMIT_CPU (SIGXCPU)
    memory_mb: int = 1024            # RLIMIT_AS
    max_procs: int = 512             # RLIMIT_NPROC (per real user; not enforced for root)
    file_size_mb: int = 16           # RLIMIT_FSIZE
    max_open_files: int = 64         # RLIMIT_NOFILE
    max_output_chars: int = 8000     # shown per stream (head + tail)
    max_capture_bytes: int = 1 << 20  # read per stream; more and the run is killed
    max_code_chars: int = 100_000
    netns: str = "auto"              # "auto" | "always" | "never": unshare -n
    audit: bool = True               # the audit hook (off only to test the other layers)
    scratch_root: str | None = None  # parent of the per-call scratch dirs (default: tempdir)
    keep_scratch: bool = False

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_procs", "file_size_mb",
                     "max_open_files", "max_output_chars", "max_capture_bytes", "max_code_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PythonConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.netns not in ("auto", "always", "never"):
            raise ValueError(f"PythonConfig.netns must be auto|always|never, got {self.netns!r}")
        if not Path(self.python).is_file():
            raise ValueError(f"PythonConfig.python {self.python!r} is not a file")


@functools.lru_cache(maxsize=1)
def unshare_prefix() -> tuple[str, ...] | None:
    """The command prefix that gives a child its own network namespace, or None if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    prefix = (exe, "-n") if os.geteuid() == 0 else (exe, "-r", "-n")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else None


def _limits(cfg: PythonConfig) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    def cap(which: int, value: int) -> None:
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))
    cap(resource.RLIMIT_CPU, cfg.cpu_s)
    cap(resource.RLIMIT_AS, cfg.memory_mb << 20)
    cap(resource.RLIMIT_NPROC, cfg.max_procs)
    cap(resource.RLIMIT_FSIZE, cfg.file_size_mb << 20)
    cap(resource.RLIMIT_NOFILE, cfg.max_open_files)
    cap(resource.RLIMIT_CORE, 0)


def _command(cfg: PythonConfig) -> list[str]:
    prefix: tuple[str, ...] = ()
    if cfg.netns != "never":
        found = unshare_prefix()
        if found is None and cfg.netns == "always":
            raise RuntimeError("PythonConfig.netns='always' but `unshare -n` does not work here")
        prefix = found or ()
    boot = _BOOTSTRAP if cfg.audit else _BOOTSTRAP.replace("sys.addaudithook(_hook)", "pass")
    return [*prefix, cfg.python, "-I", "-c", boot]


def _env(scratch: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
            "MPLCONFIGDIR": scratch, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


async def _drain(stream: asyncio.StreamReader, buf: bytearray, cap: int,
                 flooded: asyncio.Event) -> None:
    while chunk := await stream.read(1 << 16):  # past the cap: discard until EOF (the kill)
        if len(buf) + len(chunk) > cap:
            buf += chunk[:cap - len(buf)]
            flooded.set()
        else:
            buf += chunk


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_code(code: str, cfg: PythonConfig, scratch_parent: str | None = None
                   ) -> dict[str, Any]:
    """Run `code` in the sandbox; returns stdout, stderr (bytes), exit_code, and what hit a limit."""
    scratch = tempfile.mkdtemp(prefix="spyglass-py-", dir=scratch_parent or cfg.scratch_root)
    try:
        Path(scratch, "main.py").write_text(code, encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            *_command(cfg), cwd=scratch, env=_env(scratch), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=functools.partial(_limits, cfg))
        flooded, out, err = asyncio.Event(), bytearray(), bytearray()
        readers = asyncio.gather(_drain(proc.stdout, out, cfg.max_capture_bytes, flooded),  # type: ignore[arg-type]
                                 _drain(proc.stderr, err, cfg.max_capture_bytes, flooded))  # type: ignore[arg-type]
        flood_wait = asyncio.ensure_future(flooded.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait({readers, flood_wait}, timeout=cfg.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done
        finally:
            _kill_group(proc.pid)  # always: nothing the code started outlives the call
            flood_wait.cancel()
        try:  # the group is dead; pipes close unless something escaped it
            await asyncio.wait_for(readers, 5.0)
        except asyncio.TimeoutError:
            pass
        code_ = await proc.wait()
        return {"stdout": bytes(out), "stderr": bytes(err), "exit_code": code_,
                "timed_out": timed_out, "flooded": flooded.is_set() and not timed_out,
                "scratch": scratch}
    finally:
        if not cfg.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def clip(text: str, limit: int) -> str:
    """Keep the head and tail of `text` within `limit` chars, saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]}\n... [{len(text) - head - tail} characters truncated] ...\n{text[-tail:]}"


def _render(run: dict[str, Any], cfg: PythonConfig) -> str:
    parts = []
    for name in ("stdout", "stderr"):
        text = run[name].decode("utf-8", errors="replace")
        if text:
            parts.append((f"[{name}]\n" if name == "stderr" or run["stderr"] else "")
                         + clip(text, cfg.max_output_chars).rstrip("\n"))
    parts.append(f"[exit status {run['exit_code']}]")
    return "\n".join(parts)


def classify(run: dict[str, Any], cfg: PythonConfig) -> ToolResult:
    """Turn a finished run into a result: normal output, a sandbox refusal, or a limit hit."""
    text, rc = _render(run, cfg), run["exit_code"]
    meta = {"exit_code": rc}
    if run["timed_out"]:
        why = f"the code ran past the {cfg.timeout_s:g}s wall-clock limit and was killed"
    elif run["flooded"]:
        why = f"the code printed more than {cfg.max_capture_bytes} bytes and was killed"
    elif rc == EXIT_VIOLATION:
        return ToolResult(error=_err(ErrorKind.BAD_ARGS, "the sandbox refused an operation", text),
                          meta=meta)
    elif rc == EXIT_MEMORY:
        why = f"the code ran out of memory (limit {cfg.memory_mb} MB)"
    elif rc == -signal.SIGXCPU:
        why = f"the code used more than {cfg.cpu_s}s of CPU time and was killed"
    elif rc == -signal.SIGXFSZ or rc == EXIT_FSIZE:
        why = f"the code wrote a file over the {cfg.file_size_mb} MB limit and was killed"
    elif rc < 0:
        why = f"the code died from signal {signal.Signals(-rc).name}"
    else:
        return ToolResult(text=text, meta=meta)
    return ToolResult(error=_err(ErrorKind.FATAL, why, text), meta=meta)


def _err(kind: ErrorKind, why: str, text: str) -> ToolError:
    return ToolError(kind, f"Python: {why}.\n{text}", "Python")


PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "minLength": 1,
                            "description": "Python 3 source to run; print what you want to see"}},
    "required": ["code"],
    "additionalProperties": False,
}


def python_tool(cfg: PythonConfig | None = None) -> Tool:
    """The `Python` tool: arguments {"code": str}."""
    cfg = cfg or PythonConfig()
    schema = {**PARAMETERS, "properties": {"code": {
        **PARAMETERS["properties"]["code"], "maxLength": cfg.max_code_chars}}}

    async def fn(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        a = check_args("Python", schema, args)
        parent = str(ctx.scratch_dir) if ctx.scratch_dir is not None else None
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        return classify(await run_code(a["code"], cfg, parent), cfg)

    return Tool(name="Python", description=(
        "Run Python 3 code in a sandbox (no network, no files outside its scratch directory, "
        f"{cfg.timeout_s:g}s wall clock, {cfg.memory_mb} MB) and return stdout, stderr and the "
        "exit status."), parameters=schema, fn=fn, timeout_s=cfg.timeout_s + 10.0,
        max_concurrency=max(1, os.cpu_count() or 1), retries=0, cacheable=False)
