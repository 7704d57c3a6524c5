"""The Python sandbox: normal runs, and every escape or resource abuse as a clear error.

    .venv/bin/python -m pytest -q tests/test_tools_python.py
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from spyglass.engine.tools.base import ErrorKind, ToolContext, ToolError, ToolResult
from spyglass.engine.tools.python_tool import PythonConfig, clip, python_tool, unshare_prefix

CFG = PythonConfig(timeout_s=2.0, cpu_s=1, memory_mb=512, max_capture_bytes=200_000,
                   max_output_chars=2000)
TOOL = python_tool(CFG)


def py(code: str, tool: Any = TOOL, ctx: ToolContext | None = None) -> ToolResult:
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


def test_scratch_dir_is_cwd_and_is_removed(tmp_path: Path) -> None:
    r = py("import os\nopen('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), os.getcwd())\n"
           "import tempfile\nprint(tempfile.mkdtemp().startswith(os.getcwd()))",
           ctx=ToolContext(scratch_dir=tmp_path / "traj"))
    assert r.ok, r
    out = r.text.split()
    assert out[0] == "hi" and out[2] == "True"
    assert out[1].startswith(str(tmp_path / "traj")) and not Path(out[1]).exists()


def test_reading_outside_scratch_is_refused() -> None:
    refused(py("print(open('/etc/passwd').read())"), "/etc/passwd")
    refused(py("print(open('../../../../etc/passwd').read())"), "/etc/passwd")
    refused(py("import os\nprint(os.listdir('/root'))"), "os.listdir", "/root")
    refused(py("from pathlib import Path\nPath('/etc/hostname').read_bytes()"), "/etc/hostname")


def test_writing_outside_scratch_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "evil.txt"
    refused(py(f"open({str(target)!r}, 'w').write('x')"), str(target))
    refused(py(f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)"), str(target))
    refused(py(f"import os\nos.mkdir({str(tmp_path / 'd')!r})"), "os.mkdir")
    target.write_text("keep")
    refused(py(f"import os\nos.remove({str(target)!r})"), "os.remove")
    assert target.read_text() == "keep" and not (tmp_path / "d").exists()


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


def test_network_is_refused(listener: Any) -> None:
    port, accepted = listener
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    refused(py(code), "network access")
    refused(py("import urllib.request\nurllib.request.urlopen('http://example.com')"), "network")
    assert accepted == []


@pytest.mark.skipif(unshare_prefix() is None, reason="unshare -n does not work here")
def test_network_namespace_blocks_even_without_the_audit_hook(listener: Any) -> None:
    port, accepted = listener
    tool = python_tool(PythonConfig(timeout_s=5, netns="always", audit=False))
    r = py(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')",
           tool=tool)
    assert r.ok and r.meta["exit_code"] == 1 and not r.text.startswith("connected")
    assert "OSError" in r.text or "unreachable" in r.text.lower(), r.text
    assert accepted == []


def test_fork_bombs_and_subprocesses_are_refused() -> None:
    refused(py("import os\nwhile True:\n    os.fork()"), "os.fork")
    refused(py("import subprocess\nsubprocess.run(['ls', '/'])"), "subprocess.Popen")
    refused(py("import os\nos.system('echo hi')"), "os.system")
    refused(py("import multiprocessing as mp\np = mp.Process(target=print)\np.start()"), "starting")


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
    with pytest.raises(ValueError, match="netns must be auto|always|never, got 'yes'"):
        PythonConfig(netns="yes")
    assert TOOL.name == "Python" and TOOL.parameters["required"] == ["code"]


def test_clip_keeps_head_and_tail() -> None:
    text = "".join(str(i % 10) for i in range(1000))
    out = clip(text, 90)
    assert out.startswith(text[:60]) and out.endswith(text[-30:]) and "910 characters" in out
    assert clip("short", 90) == "short"
    assert os.cpu_count()
