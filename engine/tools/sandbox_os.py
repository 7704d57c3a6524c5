"""OS pieces of the Python tool's sandbox (engine/tools/python_tool.py): the seccomp filter
bubblewrap loads (built with libseccomp through ctypes; None where the library is missing), the
per-call cgroups that cap a call's processes and memory (v1 or v2, where the engine may create
them), and killing a call's processes.

    .venv/bin/python -m pytest -q tests/test_tools_python.py tests/test_sandbox_escapes.py
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


# ---------------------------------------------------------------------------------- seccomp

_DENY = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "mount", "umount2",
         "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
         "fspick", "mount_setattr", "unshare", "setns", "kexec_load", "kexec_file_load", "bpf",
         "perf_event_open", "init_module", "finit_module", "delete_module", "reboot", "swapon",
         "swapoff", "acct", "quotactl", "quotactl_fd", "lookup_dcookie", "open_by_handle_at",
         "name_to_handle_at", "syslog", "iopl", "ioperm", "settimeofday", "clock_settime",
         "clock_adjtime", "adjtimex", "vhangup", "keyctl", "add_key", "request_key",
         "userfaultfd", "fanotify_init", "io_uring_setup", "io_uring_enter", "io_uring_register",
         "uselib", "nfsservctl", "_sysctl", "sysfs")
_CLONE_NS = (0x10000000, 0x20000000, 0x00020000, 0x04000000, 0x08000000, 0x40000000, 0x02000000)
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes | None:
    """The BPF filter passed to bwrap --seccomp, or None without libseccomp (see the docstring)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    except OSError:
        return None
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW by default; deny what is listed
    if not ctx:
        return None

    def rule(name: str, err: int, *cmps: tuple[int, int, int, int]) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a syscall on this architecture
            return
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        if lib.seccomp_rule_add_array(ctx, 0x00050000 | err, nr, len(cmps), arr) < 0:
            raise OSError(f"seccomp: cannot add a rule for {name}")
    try:
        for name in _DENY:
            rule(name, errno.EPERM)
        rule("clone3", errno.ENOSYS)  # its flags are out of reach: libc falls back to clone
        for flag in _CLONE_NS:  # SCMP_CMP_MASKED_EQ = 7, SCMP_CMP_EQ = 4, SCMP_CMP_GE = 5
            rule("clone", errno.EPERM, (0, 7, flag, flag))
        for req in (_TIOCSTI, _TIOCLINUX):
            rule("ioctl", errno.EPERM, (1, 7, 0xFFFFFFFF, req))
        for family in (0, *range(3, 10)):  # only AF_UNIX (1), AF_INET (2), AF_INET6 (10)
            rule("socket", errno.EAFNOSUPPORT, (0, 4, family, 0))
        rule("socket", errno.EAFNOSUPPORT, (0, 5, 11, 0))
        fd = os.memfd_create("seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                return None
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        lib.seccomp_release(ctx)


# ---------------------------------------------------------------------------------- cgroups

@dataclass(frozen=True)
class Cgroups:
    """Where per-call cgroups go: one parent dir per hierarchy ("v2", or v1's "pids", "memory")."""

    version: str
    parents: tuple[tuple[str, str], ...]  # (controller, dir)


def _own_cgroup_dirs() -> dict[str, str]:
    """Our cgroup's directory per controller ("" for the v2 hierarchy), from /proc/self."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in (ctrls.split(",") if ctrls else [""]):
            own[c] = path
    dirs = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        root, mnt = left.split()[3], left.split()[4]
        fstype, opts = right.split()[0], right.split()[-1].split(",")
        for c in ([""] if fstype == "cgroup2" else [o for o in opts if o in ("pids", "memory")]
                  if fstype == "cgroup" else []):
            path = own.get(c)
            if path is not None and (path + "/").startswith(root.rstrip("/") + "/"):
                dirs[c] = os.path.join(mnt, path[len(root.rstrip("/")):].lstrip("/"))
    return dirs


@functools.lru_cache(maxsize=1)
def cgroups() -> Cgroups | None:
    """Writable cgroup parents with pids and memory controllers, or None (then rlimits only)."""
    try:
        dirs = _own_cgroup_dirs()
    except (OSError, ValueError, IndexError):
        return None
    tries = []
    if "pids" in dirs and "memory" in dirs:
        tries.append(Cgroups("v1", (("pids", dirs["pids"]), ("memory", dirs["memory"]))))
    if "" in dirs:
        tries.append(Cgroups("v2", (("v2", dirs[""]),)))
    for cg in tries:
        for _, parent in cg.parents:  # groups left by engines that died mid-call
            for d in Path(parent).glob("spyglass-py-*-*"):
                if not Path(f"/proc/{d.name.split('-')[2]}").exists():
                    _CallCgroup(Cgroups(cg.version, (("", str(d.parent)),)), d.name).remove()
        ctl = Path(dirs.get("", "/nonexistent"), "cgroup.subtree_control")
        try:  # v2 children get pids/memory files only when enabled here (refused with processes)
            if cg.version == "v2" and not {"pids", "memory"} <= set(ctl.read_text().split()):
                ctl.write_text("+pids +memory")
        except OSError:
            pass
        probe = _CallCgroup(cg, f"spyglass-probe-{os.getpid()}")
        try:
            probe.create(max_procs=8, memory_bytes=64 << 20)
            return cg
        except OSError:
            continue
        finally:
            probe.remove()
    return None


class _CallCgroup:
    """One call's cgroup(s): created with caps, joined by the child before exec, then removed."""

    def __init__(self, cg: Cgroups, name: str) -> None:
        self.cg = cg
        self.dirs = [(c, os.path.join(parent, name)) for c, parent in cg.parents]

    def create(self, max_procs: int, memory_bytes: int) -> None:
        for c, d in self.dirs:
            os.mkdir(d)
            files = {"pids": [("pids.max", max_procs)],
                     "memory": [("memory.limit_in_bytes", memory_bytes),
                                ("memory.memsw.limit_in_bytes", memory_bytes)],
                     "v2": [("pids.max", max_procs), ("memory.max", memory_bytes),
                            ("memory.swap.max", 0)]}[c]
            for fname, value in files:
                path = os.path.join(d, fname)
                if fname in ("pids.max", "memory.max", "memory.limit_in_bytes") or os.path.exists(path):
                    Path(path).write_text(str(value))

    def join(self) -> None:
        """In the child, before exec (as root when the engine is root)."""
        for _, d in self.dirs:
            fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

    def oom_killed(self) -> bool:
        for c, d in self.dirs:
            for fname in ("memory.events", "memory.oom_control"):
                if c in ("v2", "memory") and os.path.exists(os.path.join(d, fname)):
                    for line in Path(d, fname).read_text().splitlines():
                        key, _, n = line.partition(" ")
                        if key == "oom_kill" and int(n or 0) > 0:
                            return True
        return False

    def remove(self) -> None:
        for _, d in self.dirs:
            for _ in range(100):  # the namespace is dead; its last tasks may still be exiting
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    for pid in _pids(d):
                        _kill(pid)
                    time.sleep(0.01)


def _pids(d: str) -> list[int]:
    try:
        return [int(p) for p in Path(d, "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill(pid: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
