"""Escapes a hostile model would try on the Python tool, each asserted contained by the OS sandbox.

Every snippet starts with UNHOOK, the one line of plain Python that defeats the bootstrap's
audit hook (it replaces the names the hook reads from the bootstrap's namespace), so what these
tests check is bubblewrap's isolation alone, never the in-process hook.

    .venv/bin/python -m pytest -q tests/test_sandbox_escapes.py
"""
from __future__ import annotations

import ast
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from spyglass.engine.tools.base import ErrorKind, ToolContext, ToolResult
from spyglass.engine.tools.python_tool import PythonConfig, python_tool, sandbox

UNHOOK = ("import __main__ as m; m.NET = m.BANNED = set(); m.isinstance = lambda *a: False; "
          "m._hook = m._check_read = m._check_write = lambda *a: None\n")


if shutil.which("bwrap") is None:  # .ci/setup installs it; without it the tool refuses (tests/test_tools_python.py)
    pytest.skip("bubblewrap is not installed (apt-get install bubblewrap): the escape suite needs it",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def sandboxed() -> None:
    box = sandbox(PythonConfig().python, True)
    assert box.ok, f"the Python sandbox is unavailable here: {box.why}"


def py(code: str, **limits: Any) -> ToolResult:
    tool = python_tool(PythonConfig(**{"timeout_s": 5.0, **limits}))
    res = asyncio.run(tool.fn({"code": UNHOOK + code}, ToolContext()))
    assert res.meta["sandbox"] == "bwrap", res
    return res


def out(res: ToolResult) -> str:
    return res.text if res.ok else res.error.message


def procs_with(token: str) -> list[str]:
    """The host processes whose command line holds `token` (pgrep -f, or the same by hand)."""
    if shutil.which("pgrep"):
        return subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and int(pid) != os.getpid():
                found.append(pid)
        except OSError:
            pass
    return found


def test_the_unhook_works_and_files_outside_scratch_stay_out_of_reach(tmp_path: Path) -> None:
    secret, target = tmp_path / "outside" / "secret.txt", tmp_path / "outside" / "planted.txt"
    secret.parent.mkdir()
    secret.write_text(token := uuid.uuid4().hex)
    site = Path(sysconfig.get_paths()["purelib"]) / "sitecustomize_planted.py"
    r = py(f"""import os, socket
try:
    socket.getaddrinfo('localhost', 80)
except Exception as e:
    print('hook off:', type(e).__name__)
for p in [{str(secret)!r}, '/etc/shadow', '/etc/hostname', '/root/.bash_history']:
    try:
        print('READ', open(p).read())
    except OSError as e:
        print('read', p, type(e).__name__)
for p in [{str(tmp_path)!r}, '/home', '/root', '/work', '/var']:
    try:
        print('LIST', p, os.listdir(p))
    except OSError as e:
        print('list', p, type(e).__name__)
os.makedirs(os.path.dirname({str(target)!r}), exist_ok=True)
open({str(target)!r}, 'w').write('x')  # succeeds, in the sandbox's own /tmp
print('planted inside:', os.path.exists({str(target)!r}))
for p in [{str(site)!r}, '/usr/lib/planted', '/etc/planted', '/planted']:
    try:
        open(p, 'w').write('x')
        print('WROTE', p)
    except OSError as e:
        print('write', p, type(e).__name__)
""")
    text = out(r)
    assert r.ok, text
    assert "hook off: gaierror" in text  # the audit hook no longer refuses: the OS must hold
    assert token not in text and "READ" not in text and "WROTE" not in text, text
    assert f"read {secret} FileNotFoundError" in text and "read /etc/shadow FileNotFoundError" in text
    assert "LIST /tmp" not in text and "LIST /home" not in text, text
    assert f"write {site} " in text and "write /usr/lib/planted OSError" in text, text  # EROFS
    assert "planted inside: True" in text
    assert not target.exists() and not site.exists() and not Path("/planted").exists()


def test_the_hosts_environment_and_processes_are_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPYGLASS_ESCAPE_SECRET", token := uuid.uuid4().hex)
    r = py(f"""import os
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print('pids', sorted(map(int, pids)), 'ppid', os.getppid())
for p in sorted(set(pids) | {{str(os.getppid()), '1', {str(os.getpid())!r}, {str(os.getppid())!r}}}):
    try:
        print(p, open(f'/proc/{{p}}/environ', 'rb').read())
    except OSError as e:
        print(p, type(e).__name__)
print(dict(os.environ))
""")
    text = out(r)
    assert r.ok, text
    assert token not in text and "SPYGLASS_ESCAPE_SECRET" not in text, text
    for pid in {os.getpid(), os.getppid()} - {1, 2}:  # host pids (the sandbox has 1 and 2)
        assert f"{pid} FileNotFoundError" in text, text
    assert "pids [1, 2] ppid 1" in text  # its own PID namespace: bwrap's init and itself


def test_signals_and_pidfds_cannot_reach_the_host() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    try:
        r = py(f"""import os, signal
for pid, sig in [({victim.pid}, signal.SIGKILL), ({os.getpid()}, signal.SIGUSR1),
                 ({os.getppid()}, 0), (os.getppid(), signal.SIGUSR1)]:
    try:
        os.kill(pid, sig)
        print('kill', pid, 'sent')
    except OSError as e:
        print('kill', pid, type(e).__name__)
    try:
        fd = os.pidfd_open(pid)
        signal.pidfd_send_signal(fd, sig)
        print('pidfd', pid, 'sent')
    except OSError as e:
        print('pidfd', pid, type(e).__name__)
print('still here')
""")
        time.sleep(0.2)
        text = out(r)
        assert r.ok and "still here" in text, text
        for pid in {victim.pid, os.getpid(), os.getppid()} - {1, 2}:
            assert f"kill {pid} ProcessLookupError" in text and f"pidfd {pid} ProcessLookupError" in text
        assert victim.poll() is None and got == []  # the host's processes never got a signal
    finally:
        signal.signal(signal.SIGUSR1, old)
        victim.kill()
        victim.wait()


def test_setsid_children_do_not_outlive_the_call(tmp_path: Path) -> None:
    token, marker = f"escape-{uuid.uuid4().hex}", tmp_path / "marker"
    sleeper = (f"import os, time; time.sleep(2); os.makedirs({str(tmp_path)!r}, exist_ok=True); "
               f"open({str(marker)!r}, 'w').write('alive')")
    t0 = time.monotonic()
    r = py(f"""import os, sys
for keep_stdout in (False, True):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # a daemon: double fork, new session
            if not keep_stdout:
                os.close(1); os.close(2)
            os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}, {token!r}])
        os._exit(0)
print('parent done')
""")
    assert r.ok and "parent done" in r.text, r
    assert time.monotonic() - t0 < 4  # not held until the timeout by the daemon's stdout
    assert procs_with(token) == []
    time.sleep(3)
    assert not marker.exists() and procs_with(token) == []


def test_host_unix_sockets_are_unreachable(tmp_path: Path) -> None:
    path, abstract = str(tmp_path / "engine.sock"), f"\0spyglass-{uuid.uuid4().hex}"
    servers = []
    for addr in (path, abstract):
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
        s.listen(4)
        s.setblocking(False)
        servers.append(s)
    try:
        r = py(f"""import socket
for addr in [{path!r}, {abstract!r}]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(addr)
        print('CONNECTED', repr(addr))
    except OSError as e:
        print('unix', repr(addr), type(e).__name__)
""")
        text = out(r)
        assert r.ok and "CONNECTED" not in text, text
        assert "FileNotFoundError" in text and "ConnectionRefusedError" in text, text
        for s in servers:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in servers:
            s.close()


def test_tcp_to_the_hosts_loopback_is_unreachable() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        r = py(f"""import socket
print('interfaces', [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])
for host in ['127.0.0.1', '::1']:
    try:
        socket.create_connection((host, {port}), timeout=2)
        print('CONNECTED', host)
    except OSError as e:
        print('tcp', host, type(e).__name__, e.errno)
""")
        text = out(r)
        assert r.ok and "CONNECTED" not in text and "interfaces ['lo']" in text, text
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


def test_fork_bombs_are_capped_and_killed() -> None:
    r = py("""import os, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as e:
        print('forks', n, type(e).__name__)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
""", max_procs=32)
    text = out(r)
    assert r.ok and "BlockingIOError" in text and int(text.split()[1]) < 32, text
    token = f"bomb-{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    r = py(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {token!r}])",
           timeout_s=3.0, cpu_s=30, max_procs=64)
    assert r.error is not None and r.error.kind is ErrorKind.FATAL, r
    assert "3s wall-clock limit" in r.error.message
    assert time.monotonic() - t0 < 8
    time.sleep(0.2)
    assert procs_with(token) == []
    assert subprocess.run(["true"]).returncode == 0  # the host still forks


def test_memory_hogs_are_killed() -> None:
    for code in ("x = bytearray(8 << 30)", "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))"):
        r = py(code, memory_mb=512, cpu_s=30, timeout_s=20)
        assert r.error is not None and r.error.kind is ErrorKind.FATAL, r
        assert "out of memory (limit 512 MB)" in r.error.message


def test_memory_across_processes_is_capped_by_the_cgroup() -> None:
    box = sandbox(PythonConfig().python, True)
    if box.cgroups is None:
        pytest.skip("no writable cgroup here: memory is capped per process only (RLIMIT_AS)")
    r = py("""import os
for i in range(4):
    if os.fork() == 0:
        x = bytearray(400 << 20)
        x[::4096] = b'x' * len(range(0, 400 << 20, 4096))  # touch every page
        import time; time.sleep(3)  # all four would hold 400 MB at once
        os._exit(0)
print('statuses', sorted(os.wait()[1] for _ in range(4)))
""", memory_mb=512, cpu_s=30, timeout_s=20)
    text = out(r)
    assert r.ok and "statuses [" in text, text
    statuses = ast.literal_eval(text.split("statuses ")[1].split("]")[0] + "]")
    assert statuses.count(0) <= 1 and signal.SIGKILL in statuses, text  # OOM-killed in the cgroup


def test_infinite_loops_hit_the_wall_clock() -> None:
    t0 = time.monotonic()
    r = py("while True:\n    pass", timeout_s=2.0, cpu_s=60)
    assert r.error is not None and "2s wall-clock limit" in r.error.message
    assert time.monotonic() - t0 < 6


def test_disk_fills_stop_at_the_file_size_and_scratch_limits() -> None:
    r = py("open('big.bin', 'wb').write(b'x' * (3 << 20))", file_size_mb=1, scratch_mb=8)
    assert r.error is not None and "1 MB limit" in r.error.message, r
    r = py("""import os
for d in ['.', '/dev/shm']:
    try:
        for i in range(64):
            with open(f'{d}/f{i}', 'wb') as f:
                f.write(b'x' * (1 << 20))
    except OSError as e:
        print(d, 'stopped after', i, 'MB:', e.strerror)
""", file_size_mb=2, scratch_mb=8)
    text = out(r)
    assert r.ok, text
    assert ". stopped after" in text and "/dev/shm stopped after" in text, text
    assert text.count("No space left on device") == 2, text


def test_inside_is_nobody_without_capabilities_or_new_namespaces() -> None:
    r = py("""import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print('ids', os.getuid(), os.getgid(), os.geteuid(), os.getgroups())
print([l for l in open('/proc/self/status') if l.startswith('CapEff')])
for name, call in [('unshare-user', lambda: libc.unshare(0x10000000)),
                   ('unshare-mount', lambda: libc.unshare(0x00020000)),
                   ('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)),
                   ('ptrace', lambda: libc.ptrace(16, 1, None, None)),
                   ('setuid0', lambda: libc.setuid(0))]:
    rc = call()
    print(name, rc, os.strerror(ctypes.get_errno()) if rc != 0 else 'ok')
""")
    text = out(r)
    assert r.ok, text
    assert "ids 65534 65534 65534 [65534]" in text or "ids 65534 65534 65534 []" in text, text
    assert "CapEff:\\t0000000000000000" in text, text
    for name in ("unshare-user", "unshare-mount", "mount", "ptrace", "setuid0"):
        assert f"{name} -1 " in text, text


def test_host_sysctls_and_proc_are_read_only() -> None:
    # a root-run bwrap's nobody is root to sysctl's permission check: /proc must be read-only,
    # or core_pattern (a pipe run as root on the host at the next core dump) would be writable
    r = py("""import os
print('writable', [p for p in ['/proc/sys/kernel/core_pattern', '/proc/sys/vm/drop_caches',
                               '/proc/sysrq-trigger', '/proc/self/oom_score_adj'] if os.access(p, os.W_OK)])
try:
    open('/proc/sys/kernel/hostname', 'w').write('pwned')  # its own UTS namespace at worst
except OSError as e:
    print('hostname', e.strerror)
""")
    text = out(r)
    assert r.ok and "writable []" in text and "hostname Read-only file system" in text, text
    assert socket.gethostname() != "pwned"
