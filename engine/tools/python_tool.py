"""The Python tool: run model-written code in an OS sandbox (bubblewrap) and return its output.

Each call runs the configured interpreter under `bwrap` (Debian's `bubblewrap`) with:
  * fresh user, PID, mount, IPC, UTS, network and cgroup namespaces (--unshare-all, and
    --disable-userns: no nested user namespaces); inside, uid/gid 65534 (nobody), no
    capabilities. When the engine is root and the interpreter's paths are readable by others,
    bwrap itself runs as an unused uid of its own per call (UID_BASE + a slot), so the code is
    nobody on the host too and RLIMIT_NPROC counts that call's processes only; otherwise (say a
    pyenv under /root) bwrap runs as root and nobody inside is root outside, still with no
    capabilities and nothing writable of the host's;
  * a root holding only: /usr (and the /bin, /lib* links), the interpreter's base prefix, a
    venv's pyvenv.cfg, bin and (site_packages=True) site-packages, /etc/ld.so.cache,
    /etc/localtime and /etc/fonts, all read-only; a /proc of its own PID namespace (the host's processes are
    invisible: no /proc/<pid>/environ, kill, pidfd or ptrace of them); a minimal /dev; `/`,
    /proc and /dev remounted read-only (a root-run bwrap's nobody is root to sysctl's
    permission check: /proc/sys must not be writable). The only writable places are a tmpfs of `scratch_mb` at /tmp (the
    cwd, HOME and TMPDIR; the code is /tmp/main.py) and one of SHM_MB at /dev/shm: nothing goes
    to the host's disk and all of it is gone when the call ends;
  * no network: an empty network namespace (the host's unix sockets are not in its mount
    namespace; abstract ones belong to the network namespace);
  * a cleared environment, --new-session (no TIOCSTI), --die-with-parent;
  * a seccomp filter, built with libseccomp through ctypes where libseccomp.so.2 is installed
    (meta["seccomp"]), failing ptrace, mount, bpf, kexec, perf_event_open, keyctl, userfaultfd,
    io_uring, modules, namespaces and socket families but unix/inet/inet6. It shrinks the
    kernel surface; the namespaces and the uid are the boundary;
  * rlimits set before bwrap execs (CPU, AS, FSIZE, NOFILE, NPROC, CORE=0) and, where the engine
    may make cgroups (v1, or v2 with pids and memory), a cgroup per call with pids.max and a
    memory cap over all its processes (meta["cgroup"]). RLIMIT_NPROC does not bind root, so a
    root-run bwrap without a cgroup has no process cap and is refused;
  * a wall-clock timeout, then bwrap's process group is SIGKILLed. When bwrap dies, or the
    code's main process ends, its PID namespace's init dies and the kernel kills every process
    left in it: nothing the code started (setsid, daemons) outlives the call;
  * stdout/stderr captured up to `max_capture_bytes` each (beyond that the run is killed) and
    shown truncated (head and tail) to `max_output_chars` each.

Packages: exactly the configured interpreter's environment: its standard library and, with
site_packages=True, its site-packages (by default the engine's own venv: numpy, Pillow, OpenCV,
pandas, ...). For a curated set, point `python` at a venv made for it; site_packages=False is
the standard library only.

The sandbox is probed once per (python, site_packages). If bwrap is missing, the probe run fails
or no process cap is possible, every call returns a fatal error and runs nothing, unless the
user sets unsafe_no_sandbox=True: a plain subprocess with the rlimits, a host scratch dir and
the process-group kill only (meta["sandbox"] says so). The bootstrap's audit hook only turns
network attempts into a clear message; nothing depends on it.

Outcomes: exit status 0 or an ordinary exception in the user's code (a file outside the sandbox
is simply not there) -> a normal result with its traceback (meta["exit_code"]). A network
attempt -> bad_args ("sandbox: ..."). Wall-clock timeout, CPU, memory or file-size limit, output
flood, death by a signal, a sandbox that failed to start -> fatal. Nothing raises.

    tool = python_tool(PythonConfig(timeout_s=10))
    res = await tool.fn({"code": "print(6*7)"}, ToolContext())   # res.text -> "42\n[exit status 0]"
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import json
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
from spyglass.engine.tools.sandbox_os import Cgroups, _CallCgroup, _kill, cgroups, seccomp_program

EXIT_VIOLATION = 86  # the bootstrap's exit status when a sandbox refusal went uncaught
EXIT_MEMORY = 87     # ... when MemoryError went uncaught
EXIT_FSIZE = 88      # ... when a write failed with EFBIG (RLIMIT_FSIZE)
NOBODY = 65534       # uid and gid inside the sandbox
UID_BASE = 1_800_000_000  # outside uids of root-started sandboxes: UID_BASE + (pid, call) slot
SHM_MB = 8           # the /dev/shm tmpfs
REFUSAL = "the Python tool needs bubblewrap (apt-get install bubblewrap); refusing to run code"

# Runs before the user's code (cwd = the scratch dir, argv[1] = the status fd): installs the
# network-message hook, then execs main.py (so tracebacks show the user's lines). It writes
# "exit" to the status fd when the code ended on its own, so a status over 128 is told apart
# from bwrap's 128+signal.
_BOOTSTRAP = r'''
import os, sys, traceback
MAIN, STATUS = os.path.join(os.getcwd(), "main.py"), int(sys.argv[1])
class SandboxViolation(PermissionError):
    pass
NET = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
       "socket.gethostbyaddr"}
def _hook(event, args):  # the message only: the sandbox has no network whatever this does
    if event in NET or (event in ("socket.connect", "socket.sendto") and isinstance(args[1], tuple)):
        raise SandboxViolation(f"sandbox: network access ({event}) is not available")
def _done(write=os.write, STATUS=STATUS):
    try:
        write(STATUS, b"exit\n")
    except OSError:
        pass
def _report(e, isinstance=isinstance, any=any, format_exception=traceback.format_exception,
            err=sys.stderr, out=sys.stdout, done=_done, exit=os._exit, Violation=SandboxViolation):
    # names bound at definition: code that rebinds this module's globals (as an unhook does)
    # still has its failure classified
    if isinstance(e, MemoryError):
        msg, rc = "MemoryError: the code ran out of memory\n", 87
    elif isinstance(e, OSError) and e.errno == 27:  # EFBIG (RLIMIT_FSIZE; SIGXFSZ is ignored)
        msg, rc = f"OSError: {e}\n", 88
    else:  # the traceback without the bootstrap's own frames
        msg = "".join(x for x in format_exception(e) if not x.startswith('  File "<string>"'))
        chain, c = [], e
        while c is not None and len(chain) < 64:
            chain.append(c)
            c = c.__cause__ or c.__context__
        rc = 86 if any(isinstance(x, Violation) for x in chain) else 1
    err.write(msg)
    err.flush(); out.flush(); done(); exit(rc)
with open(MAIN, encoding="utf-8") as f:
    SRC = f.read()
sys.argv = [MAIN]
sys.path[:0] = [os.getcwd()]
sys.addaudithook(_hook)
_g = {"__name__": "__main__", "__file__": MAIN, "__builtins__": __builtins__}
try:
    exec(compile(SRC, MAIN, "exec"), _g)
except SystemExit:
    _done()
    raise
except BaseException as e:
    _report(e)
_done()
'''


@dataclass
class PythonConfig:
    """Limits of the Python sandbox (see the module docstring)."""

    python: str = sys.executable     # the interpreter the code runs on (its env = the packages)
    site_packages: bool = True       # expose the interpreter's site-packages (False: stdlib only)
    timeout_s: float = 10.0          # wall clock, then the whole sandbox is killed
    cpu_s: int = 10                  # RLIMIT_CPU (SIGXCPU)
    memory_mb: int = 1024            # RLIMIT_AS per process; the cgroup's cap over all of them
    max_procs: int = 64              # RLIMIT_NPROC and the cgroup's pids.max (threads count)
    file_size_mb: int = 16           # RLIMIT_FSIZE
    scratch_mb: int = 64             # size of the /tmp tmpfs (cwd): the code's disk
    max_open_files: int = 64         # RLIMIT_NOFILE
    max_output_chars: int = 8000     # shown per stream (head + tail)
    max_capture_bytes: int = 1 << 20  # read per stream; more and the run is killed
    max_code_chars: int = 100_000
    unsafe_no_sandbox: bool = False  # run without bubblewrap (rlimits only): NOT a sandbox

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_procs", "file_size_mb",
                     "scratch_mb", "max_open_files", "max_output_chars", "max_capture_bytes",
                     "max_code_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PythonConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not Path(self.python).is_file():
            raise ValueError(f"PythonConfig.python {self.python!r} is not a file")


# ---------------------------------------------------------------------------------- the sandbox

@dataclass(frozen=True)
class Sandbox:
    """The probed sandbox for one interpreter: how to start it, or why it cannot be had."""

    ok: bool
    why: str = ""                          # when not ok
    bwrap: str = ""
    python: str = ""
    binds: tuple[str, ...] = ()            # host paths bound read-only at the same path
    links: tuple[tuple[str, str], ...] = ()  # (target, path) symlinks such as /lib -> usr/lib
    own_uid: bool = False                  # bwrap runs as a per-call unprivileged uid
    seccomp: bytes | None = None
    cgroups: Cgroups | None = None


_calls = itertools.count()
_removing: set[asyncio.Future[None]] = set()  # per-call cgroups being removed


def _layout(python: str, site_packages: bool) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The read-only binds and links the interpreter needs (asked of the interpreter itself)."""
    q = ("import sys, sysconfig, json; p = sysconfig.get_paths(); print(json.dumps([sys.prefix, "
         "sys.base_prefix, sys.base_exec_prefix, p['purelib'], p['platlib']]))")
    prefix, base, base_exec, purelib, platlib = json.loads(subprocess.run(
        [python, "-I", "-c", q], capture_output=True, timeout=30, check=True, env={}).stdout)
    binds = ["/usr", base, base_exec]
    if prefix != base:  # a venv: its marker, its bin (the interpreter's symlinks)
        binds += [os.path.join(prefix, "pyvenv.cfg"), os.path.dirname(os.path.abspath(python))]
    if site_packages:
        binds += [purelib, platlib]
    binds += [p for p in ("/etc/ld.so.cache", "/etc/localtime", "/etc/fonts") if os.path.exists(p)]
    links = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append(top)
    out: list[str] = []
    for b in binds:  # drop duplicates and paths already under another bind
        if os.path.exists(b) and not any(b == o or b.startswith(o.rstrip("/") + "/") for o in out):
            out = [o for o in out if not o.startswith(b.rstrip("/") + "/")] + [b]
    return tuple(out), tuple(links)


def _world_traversable(path: str) -> bool:
    """Whether an unprivileged uid can reach `path` (every ancestor searchable by others)."""
    for p in (Path(path), Path(os.path.realpath(path))):
        if not all(os.stat(a).st_mode & 0o001 for a in [*p.parents, p] if a.is_dir()):
            return False
    return True


_PROBE = ("import os; assert os.getuid() == 65534 and os.getpid() < 10, os.getpid(); "
          "open('/tmp/w', 'w').write('x'); print('sandbox ok')")


@functools.lru_cache(maxsize=8)
def sandbox(python: str, site_packages: bool = True) -> Sandbox:
    """Probe (once per interpreter) how to run code under bwrap here; see the module docstring."""
    exe = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if exe is None:
        return Sandbox(False, "`bwrap` is not installed")
    try:
        binds, links = _layout(python, site_packages)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return Sandbox(False, f"cannot ask {python} for its paths: {e}")
    base = Sandbox(True, bwrap=exe, python=os.path.abspath(python), binds=binds, links=links,
                   seccomp=seccomp_program(), cgroups=cgroups())
    modes = [True, False] if os.geteuid() == 0 else [False]
    if not all(_world_traversable(b) for b in binds):
        modes = [m for m in modes if not m]
    errors = []
    for own_uid in modes:
        box = Sandbox(**{**base.__dict__, "own_uid": own_uid})
        if os.geteuid() == 0 and not own_uid and box.cgroups is None:
            errors.append("bwrap would run as root (the interpreter's paths are not readable by "
                          "others) and no cgroup can be made here, so nothing would cap the "
                          "code's processes")
            continue
        cfg = PythonConfig(python=python, site_packages=site_packages, timeout_s=30)
        run = asyncio.run(run_code(_PROBE, cfg, box))
        if run["exit_code"] == 0 and run["stdout"].startswith(b"sandbox ok"):
            return box
        errors.append(f"the probe run failed ({run['exit_code']}): "
                      f"{run['stderr'].decode(errors='replace').strip()[-500:]}")
    return Sandbox(False, "; ".join(errors))


def _bwrap_argv(box: Sandbox, cfg: PythonConfig, fds: dict[str, int]) -> list[str]:
    argv = [box.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
            "--clearenv"]
    for k, v in _env("/tmp").items():
        argv += ["--setenv", k, v]
    # the tmpfs mounts first, then the binds: an interpreter or venv that lives under /tmp (a CI
    # clone) stays visible on top of the scratch tmpfs instead of being hidden by it
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm",
             "--size", str(cfg.scratch_mb << 20), "--tmpfs", "/tmp"]
    for b in box.binds:
        argv += ["--ro-bind", b, b]
    for target, path in box.links:
        argv += ["--symlink", target, path]
    argv += ["--file", str(fds["code"]), "/tmp/main.py", "--chdir", "/tmp",
             "--remount-ro", "/proc", "--remount-ro", "/dev", "--remount-ro", "/"]
    if "seccomp" in fds:
        argv += ["--seccomp", str(fds["seccomp"])]
    return [*argv, "--", box.python, "-I", *([] if cfg.site_packages else ["-S"]),
            "-c", _BOOTSTRAP, str(fds["status"])]


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "MPLCONFIGDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "USER": "nobody",
            "LOGNAME": "nobody", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def _child_setup(cfg: PythonConfig, uid: int | None, cg: _CallCgroup | None) -> None:
    """preexec_fn: runs in the child between fork and exec (cgroup, uid, then rlimits)."""
    if cg is not None:
        cg.join()
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

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


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


async def _drain(stream: asyncio.StreamReader, buf: bytearray, cap: int,
                 flooded: asyncio.Event) -> None:
    while chunk := await stream.read(1 << 16):  # past the cap: discard until EOF (the kill)
        if len(buf) + len(chunk) > cap:
            buf += chunk[:cap - len(buf)]
            flooded.set()
        else:
            buf += chunk


async def run_code(code: str, cfg: PythonConfig, box: Sandbox | None,
                   scratch_parent: str | None = None) -> dict[str, Any]:
    """Run `code` in `box` (None: unsafe, a plain subprocess); returns stdout, stderr (bytes),
    exit_code (-signal when a signal killed it), and what hit a limit."""
    n = next(_calls)
    status_r, status_w = os.pipe()
    fds = {"status": status_w}
    scratch = cg = uid = None
    try:
        if box is None:
            scratch = tempfile.mkdtemp(prefix="spyglass-py-", dir=scratch_parent)
            Path(scratch, "main.py").write_text(code, encoding="utf-8")
            argv, cwd, env = [cfg.python, "-I", "-c", _BOOTSTRAP, str(status_w)], scratch, _env(scratch)
        else:
            fds["code"] = _memfd("main.py", code.encode("utf-8"))
            if box.seccomp is not None:
                fds["seccomp"] = _memfd("seccomp", box.seccomp)
            argv, cwd, env = _bwrap_argv(box, cfg, fds), "/", _env("/tmp")
            if box.own_uid:
                uid = UID_BASE + ((os.getpid() & 0xFFFF) << 10) + (n & 0x3FF)
            if box.cgroups is not None:
                cg = _CallCgroup(box.cgroups, f"spyglass-py-{os.getpid()}-{n}")
                cg.create(cfg.max_procs, (cfg.memory_mb + cfg.scratch_mb + SHM_MB + 32) << 20)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, pass_fds=tuple(fds.values()),
            preexec_fn=functools.partial(_child_setup, cfg, uid, cg))
        for fd in fds.values():
            os.close(fd)
        fds.clear()
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
            _kill(proc.pid, group=True)  # always: bwrap (init) dies, and with it the namespace
            flood_wait.cancel()
        try:  # everything is dead; pipes close unless something escaped
            await asyncio.wait_for(readers, 5.0)
        except asyncio.TimeoutError:
            pass
        rc = await proc.wait()
        os.set_blocking(status_r, False)
        try:
            exited = os.read(status_r, 64).startswith(b"exit")
        except OSError:
            exited = False
        if box is not None and not exited and rc > 128:  # bwrap reports 128 + signal
            rc = -(rc - 128)
        return {"stdout": bytes(out), "stderr": bytes(err), "exit_code": rc, "exited": exited,
                "timed_out": timed_out, "flooded": flooded.is_set() and not timed_out,
                "oom": cg is not None and not exited and cg.oom_killed()}
    finally:
        for fd in [*fds.values(), status_r]:
            os.close(fd)
        if cg is not None:  # in the background: the last tasks leave the group a little later
            fut = asyncio.get_running_loop().run_in_executor(None, cg.remove)
            _removing.add(fut)
            fut.add_done_callback(_removing.discard)
        if scratch is not None:
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


def classify(run: dict[str, Any], cfg: PythonConfig, meta: dict[str, Any] | None = None
             ) -> ToolResult:
    """Turn a finished run into a result: normal output, a sandbox refusal, or a limit hit."""
    text, rc = _render(run, cfg), run["exit_code"]
    meta = {"exit_code": rc, **(meta or {})}
    if run["timed_out"]:
        why = f"the code ran past the {cfg.timeout_s:g}s wall-clock limit and was killed"
    elif run["flooded"]:
        why = f"the code printed more than {cfg.max_capture_bytes} bytes and was killed"
    elif rc == EXIT_VIOLATION:
        return ToolResult(error=_err(ErrorKind.BAD_ARGS, "the sandbox refused an operation", text),
                          meta=meta)
    elif rc == EXIT_MEMORY or run.get("oom"):
        why = f"the code ran out of memory (limit {cfg.memory_mb} MB)"
    elif rc == -signal.SIGXCPU:
        why = f"the code used more than {cfg.cpu_s}s of CPU time and was killed"
    elif rc == -signal.SIGXFSZ or rc == EXIT_FSIZE:
        why = f"the code wrote a file over the {cfg.file_size_mb} MB limit and was killed"
    elif rc < 0:
        why = f"the code died from signal {signal.Signals(-rc).name}"
    elif rc != 0 and not run.get("exited", True) and run["stderr"].startswith(b"bwrap:"):
        why = "the sandbox failed to start"
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
        if cfg.unsafe_no_sandbox:
            parent = str(ctx.scratch_dir) if ctx.scratch_dir is not None else None
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            return classify(await run_code(a["code"], cfg, None, parent), cfg,
                            {"sandbox": "none (unsafe_no_sandbox=True)"})
        box = await asyncio.to_thread(sandbox, cfg.python, cfg.site_packages)
        if not box.ok:
            return ToolResult(error=ToolError(ErrorKind.FATAL, f"Python: {REFUSAL}: {box.why}.",
                                              "Python"), meta={"sandbox": "unavailable"})
        meta = {"sandbox": "bwrap", "seccomp": box.seccomp is not None,
                "cgroup": box.cgroups.version if box.cgroups else None,
                "outer_uid": "per-call" if box.own_uid else os.geteuid()}
        try:
            return classify(await run_code(a["code"], cfg, box), cfg, meta)
        except (OSError, subprocess.SubprocessError) as e:  # a cgroup or the spawn failed
            return ToolResult(error=_err(ErrorKind.FATAL, "the sandbox failed to start", str(e)),
                              meta=meta)

    return Tool(name="Python", description=(
        "Run Python 3 code in a sandbox (no network; its cwd, a fresh scratch directory, is the "
        f"only writable place; {cfg.timeout_s:g}s wall clock, {cfg.memory_mb} MB) and return "
        "stdout, stderr and the exit status."), parameters=schema, fn=fn, timeout_s=cfg.timeout_s + 10.0,
        max_concurrency=max(1, os.cpu_count() or 1), retries=0, cacheable=False)
