"""The Python tool: ordinary runs under the sandbox, limits, the refusal and the unsafe opt-in.

The hostile escape suite is tests/test_sandbox_escapes.py.

    .venv/bin/python -m pytest -q tests/test_tools_python.py
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from spyglass.engine.tools.base import ErrorKind, ToolContext, ToolError, ToolResult
from spyglass.engine.tools import python_tool as python_tool_module
from spyglass.engine.tools.python_tool import REFUSAL, PythonConfig, Sandbox, clip, python_tool, sandbox

CFG = PythonConfig(timeout_s=2.0, cpu_s=1, memory_mb=512, max_capture_bytes=200_000,
                   max_output_chars=2000)
TOOL = python_tool(CFG)


def py(code: str, tool: Any = TOOL, ctx: ToolContext | None = None) -> ToolResult:
    if shutil.which("bwrap") is None:  # .ci/setup installs it; the refusal itself is tested below
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    return asyncio.run(tool.fn({"code": code}, ctx or ToolContext()))


def refused(res: ToolResult, *words: str) -> None:
    assert res.error is not None and res.error.kind is ErrorKind.BAD_ARGS, res
    assert "sandbox refused" in res.error.message
    for w in words:
        assert w in res.error.message, res.error.message


def test_runs_code_and_returns_output() -> None:
    r = py("import sys, math\nprint(math.factorial(10))\nprint('warn', file=sys.stderr)")
    assert r.ok and r.meta["exit_code"] == 0
    assert r.text == "[stdout]\n3628800\n[stderr]\nwarn\n[exit status 0]"
    r = py("import numpy as np\nprint(int(np.arange(10).sum()))")
    assert r.ok and r.text.startswith("45")


def test_exception_is_a_normal_result_with_a_clean_traceback() -> None:
    r = py("def f():\n    return 1 / 0\nf()")
    assert r.ok and r.meta["exit_code"] == 1
    assert "ZeroDivisionError: division by zero" in r.text and "return 1 / 0" in r.text
    assert '"<string>"' not in r.text and "[exit status 1]" in r.text
    r = py("print(")
    assert r.ok and "SyntaxError" in r.text
    r = py("import sys; sys.exit(3)")
    assert r.ok and r.meta["exit_code"] == 3
    r = py("import sys; sys.exit(200)")  # over 128 but not a signal: the bootstrap said it exited
    assert r.ok and r.meta["exit_code"] == 200


def test_deaths_by_signal_and_sandbox_failures_are_fatal() -> None:
    r = py("import os, signal\nprint('up', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert r.error.kind is ErrorKind.FATAL and "signal SIGSEGV" in r.error.message
    assert "up" in r.error.message and r.meta["exit_code"] == -11
    run = {"stdout": b"", "stderr": b"bwrap: Creating new namespace failed: Resource temporarily "
           b"unavailable\n", "exit_code": 1, "exited": False, "timed_out": False, "flooded": False}
    res = python_tool_module.classify(run, CFG)
    assert res.error.kind is ErrorKind.FATAL and "the sandbox failed to start" in res.error.message


def test_scratch_is_a_private_tmpfs_cwd(tmp_path: Path) -> None:
    r = py("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.getcwd())\n"
           "import tempfile\nprint(tempfile.mkdtemp().startswith(os.getcwd()))",
           ctx=ToolContext(scratch_dir=tmp_path / "traj"))
    assert r.ok, r
    assert r.text.split()[:3] == ["hi", "/tmp", "True"]
    assert r.meta["sandbox"] == "bwrap" and r.meta["exit_code"] == 0
    assert not (tmp_path / "traj").exists()  # nothing of the call touches the host's disk
    r = py("import os\nprint(sorted(os.listdir('.')))")  # a fresh scratch per call (beside it only the
    assert "'main.py'" in r.text and "a.txt" not in r.text, r  # read-only path of a venv under /tmp)


def test_files_outside_scratch_are_not_there_or_read_only(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("hunter2")
    r = py(f"print(open({str(tmp_path / 'secret.txt')!r}).read())")
    assert r.ok and r.meta["exit_code"] == 1 and "FileNotFoundError" in r.text
    assert "hunter2" not in r.text
    r = py("print(open('/etc/passwd').read())")
    assert r.ok and "FileNotFoundError" in r.text
    # the root holds the fresh mounts and the top folders of the interpreter's read-only binds,
    # nothing else of the host (the clone may live under /work, /check, /tmp...)
    box = sandbox(CFG.python, CFG.site_packages)
    tops = {"dev", "proc", "tmp"} | {Path(p).parts[1] for p in [*box.binds, *(l for _, l in box.links)]}
    r = py("import os\nprint(sorted(os.listdir('/')))")
    assert r.ok and r.text.splitlines()[0] == str(sorted(tops)), (r.text, tops)
    assert "'home'" not in r.text
    r = py("open('/usr/evil.txt', 'w')")
    assert r.ok and "Read-only file system" in r.text
    r = py(f"open({str(tmp_path / 'evil.txt')!r}, 'w').write('x')")
    assert r.ok and "FileNotFoundError" in r.text and not (tmp_path / "evil.txt").exists()


@pytest.fixture
def listener() -> Any:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    accepted: list[Any] = []

    def accept() -> None:
        try:
            accepted.append(srv.accept())
        except OSError:
            pass
    th = threading.Thread(target=accept)
    th.start()
    yield srv.getsockname()[1], accepted
    th.join()
    srv.close()


def test_network_attempts_get_a_clear_message(listener: Any) -> None:
    port, accepted = listener
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    refused(py(code), "network access", "not available")
    refused(py("import urllib.request\nurllib.request.urlopen('http://example.com')"), "network")
    assert accepted == []


def test_processes_run_inside_the_sandbox_only() -> None:
    r = py("import os, subprocess\nls = subprocess.run(['ls', '/'], capture_output=True, text=True)\n"
           "print(ls.stdout.split() == sorted(os.listdir('/')), ls.stdout.split())")
    assert r.ok and r.text.startswith("True") and "'home'" not in r.text, r.text
    r = py("import multiprocessing as mp\nwith mp.Pool(2) as p:\n    print(p.map(abs, [-1, -2]))")
    assert r.ok and r.text.startswith("[1, 2]"), r.text
    r = py("import os\nprint(os.getuid(), os.getgid(), os.getpid(), sorted(os.listdir('/proc'))[:2])")
    assert r.ok and r.text.startswith("65534 65534 2 ['1', '2']"), r.text


def test_infinite_loop_hits_a_limit() -> None:
    # cpu_s=1 well under the wall clock (the CI machine is shared): SIGXCPU
    r = py("while True:\n    pass", tool=python_tool(PythonConfig(cpu_s=1, timeout_s=30)))
    assert r.error.kind is ErrorKind.FATAL and "CPU time" in r.error.message
    r = py("import time\nprint('before', flush=True)\ntime.sleep(60)")
    assert r.error.kind is ErrorKind.FATAL and "2s wall-clock limit" in r.error.message
    assert "before" in r.error.message


def test_memory_hogs_hit_the_memory_limit() -> None:
    tool = python_tool(PythonConfig(timeout_s=60, cpu_s=30, memory_mb=512))  # memory first
    r = py("x = bytearray(4 * 1024 ** 3)", tool=tool)
    assert r.error.kind is ErrorKind.FATAL and "out of memory (limit 512 MB)" in r.error.message
    r = py("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)", tool=tool)
    assert r.error.kind is ErrorKind.FATAL and "out of memory" in r.error.message


def test_big_files_hit_the_file_size_limit() -> None:
    tool = python_tool(PythonConfig(timeout_s=5, file_size_mb=1))
    r = py("open('big.bin', 'wb').write(b'x' * (3 << 20))", tool=tool)
    assert r.error.kind is ErrorKind.FATAL and "1 MB limit" in r.error.message


def test_huge_output_is_truncated_or_killed() -> None:
    r = py("for i in range(20000):\n    print(i)")  # ~110 KB: under the capture cap
    assert r.ok and "characters truncated" in r.text
    assert r.text.startswith("0\n1\n") and "19999" in r.text and len(r.text) < 2200
    r = py("while True:\n    print('x' * 1000)")
    assert r.error.kind is ErrorKind.FATAL and "more than 200000 bytes" in r.error.message
    assert len(r.error.message) < 2500


def test_non_utf8_output_is_replaced() -> None:
    r = py("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')")
    assert r.ok and r.text.startswith("ok \ufffd\ufffd end")


def test_bad_arguments_and_configs() -> None:
    with pytest.raises(ToolError, match="missing required argument"):
        asyncio.run(TOOL.fn({}, ToolContext()))
    with pytest.raises(ToolError, match="'code' must be of type string"):
        asyncio.run(TOOL.fn({"code": 42}, ToolContext()))
    with pytest.raises(ToolError, match="at most 10 allowed"):
        asyncio.run(python_tool(PythonConfig(max_code_chars=10)).fn({"code": "x" * 11}, ToolContext()))
    with pytest.raises(ValueError, match="memory_mb must be > 0, got 0"):
        PythonConfig(memory_mb=0)
    with pytest.raises(ValueError, match="scratch_mb must be > 0, got -1"):
        PythonConfig(scratch_mb=-1)
    with pytest.raises(ValueError, match="python '/nope/python' is not a file"):
        PythonConfig(python="/nope/python")
    assert TOOL.name == "Python" and TOOL.parameters["required"] == ["code"]


def test_clip_keeps_head_and_tail() -> None:
    text = "".join(str(i % 10) for i in range(1000))
    out = clip(text, 90)
    assert out.startswith(text[:60]) and out.endswith(text[-30:]) and "910 characters" in out
    assert clip("short", 90) == "short"
    assert os.cpu_count()


def test_without_a_sandbox_the_tool_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    monkeypatch.setattr(python_tool_module, "sandbox",
                        lambda python, site_packages: Sandbox(False, "the probe run failed (1)"))
    r = py(f"open({str(marker)!r}, 'w').write('x')", tool=python_tool(PythonConfig(timeout_s=5)))
    assert r.error is not None and r.error.kind is ErrorKind.FATAL and REFUSAL in r.error.message
    assert "apt-get install bubblewrap" in r.error.message and "probe run failed" in r.error.message
    assert r.meta["sandbox"] == "unavailable" and not marker.exists()
    monkeypatch.setattr(python_tool_module.shutil, "which", lambda *a, **k: None)
    assert sandbox.__wrapped__(PythonConfig().python, True) == Sandbox(False, "`bwrap` is not installed")


def test_unsafe_opt_in_runs_without_the_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(python_tool_module, "sandbox", lambda *a: pytest.fail("probed"))
    tool = python_tool(PythonConfig(timeout_s=5, unsafe_no_sandbox=True))
    r = py(f"import os\nprint(os.getuid() == {os.getuid()}, os.getcwd().startswith({str(tmp_path)!r}))",
           tool=tool, ctx=ToolContext(scratch_dir=tmp_path))
    assert r.ok and r.text.startswith("True True"), r.text
    assert r.meta["sandbox"] == "none (unsafe_no_sandbox=True)" and list(tmp_path.iterdir()) == []
    r = py("import time\ntime.sleep(60)", tool=python_tool(PythonConfig(timeout_s=1, unsafe_no_sandbox=True)))
    assert r.error.kind is ErrorKind.FATAL and "1s wall-clock limit" in r.error.message
