"""Weight sync through shared memory, for a server colocated with trainer rank 0 (in-process vLLM).

The trainer packs each bucket into one flat byte buffer the server's workers map themselves:

* CPU: a file in /dev/shm (`torch.from_file(shared=True)` on both ends: one copy in, none out);
  its space is reserved up front with posix_fallocate, so a too-small /dev/shm (Docker's
  default is 64 MB) is one error naming the sizes, never a SIGBUS mid-copy; the trainer holds a
  lock on its file, and a file whose lock is free (its trainer was killed) is removed by the next
  buffer made on the host;
* CUDA: a device buffer exported once as a CUDA IPC handle (torch's own `reduce_tensor`, sent as
  plain fields, never a pickle), opened by the worker with torch's `rebuild_cuda_tensor` on its
  local index of the same physical GPU (matched by UUID, so CUDA_VISIBLE_DEVICES may differ
  between the two processes).

Each tensor starts at a multiple of `ALIGN` bytes, so the worker views it in its dtype without
a copy. The server call carries (names, dtypes, shapes, offsets, handle, version, last) as JSON
and returns once the worker has loaded (or copied) the bucket; only then is the buffer reused
for the next one, and it grows (a new file / allocation) when a bucket is larger. This is the
"ipc" transport of `trainer/weight_sync.py`; the receiving end is
`spyglass.engine.backends.vllm_ext.WeightSyncWorker.spyglass_receive_shared`.

    .venv/bin/python -m pytest -q tests/test_weight_sync.py -k shared
"""
from __future__ import annotations

import base64
import fcntl
import inspect
import os
import tempfile
import time
from typing import Any, Optional

import torch

ALIGN = 256  # bytes: every tensor's offset in the buffer (any dtype's size divides it)
SHM_DIR = "/dev/shm"


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in the flat buffer, and the bytes the buffer needs."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, end


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def pack(flat: torch.Tensor, tensors: list[torch.Tensor], offsets: list[int]) -> None:
    """Copy each tensor's bytes into the uint8 buffer `flat` at its offset."""
    for t, off in zip(tensors, offsets):
        b = _bytes_of(t)
        flat[off:off + b.numel()].copy_(b)


def unpack(flat: torch.Tensor, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
           offsets: list[int]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) of each tensor packed in `flat` (no copy: they live as long as the buffer
    does), as `weight_sync.receive_bucket` gives them from the group."""
    if not len(names) == len(dtypes) == len(shapes) == len(offsets):
        raise ValueError(f"a shared bucket has {len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes "
                         f"and {len(offsets)} offsets")
    out = []
    for name, dtype, shape, off in zip(names, dtypes, shapes, offsets):
        n = torch.Size(shape).numel() * dtype.itemsize
        if off % ALIGN or off + n > flat.numel():
            raise ValueError(f"tensor at byte {off} (+{n}) does not fit a {flat.numel()}-byte shared buffer")
        out.append((name, flat[off:off + n].view(dtype).view(shape)))
    return out


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _local_index(uuid: str) -> int:
    """This process's index of the GPU with `uuid` (CUDA_VISIBLE_DEVICES may renumber it)."""
    for i in range(torch.cuda.device_count()):
        if _device_uuid(i) == uuid:
            return i
    raise RuntimeError(f"the trainer's GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): shared-memory sync needs the server "
                       "on the trainer's node and that GPU visible to it")


PREFIX = "spyglass-weights-"  # /dev/shm/spyglass-weights-<pid>-<random>
_BYTES = ("storage_handle", "ref_counter_handle", "event_handle")  # the CUDA export's byte fields
_INTS = ("storage_size_bytes", "storage_offset_bytes", "ref_counter_offset")


def _sweep(folder: str) -> None:
    """Remove buffers left by trainers that died without closing them: a live trainer holds a
    lock on its file (flock: it holds across pid namespaces sharing the folder), a dead one's
    is free."""
    for name in os.listdir(folder):
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:  # locked: its trainer is alive (or it vanished meanwhile)
            pass
        finally:
            os.close(fd)


class SharedBuffer:
    """The trainer's flat buffer: `flat` (uint8, `nbytes`) and `handle()`, what a worker passes
    to `open_shared` to map the same memory. `close()` frees it (the /dev/shm file is unlinked;
    one a killed trainer left, its lock gone with it, is removed by the next trainer on the host)."""

    def __init__(self, nbytes: int, device: torch.device, shm_dir: str = SHM_DIR) -> None:
        self.nbytes, self.device, self.path, self._fd = nbytes, device, "", -1
        self._export: Optional[dict[str, Any]] = None
        if device.type == "cuda":
            self.flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            return
        if device.type != "cpu":
            raise ValueError(f"shared-memory sync takes a cpu or cuda buffer, not {device}")
        folder = shm_dir if os.path.isdir(shm_dir) else tempfile.gettempdir()
        _sweep(folder)
        fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=folder)
        self._fd = fd  # held open, locked, while the buffer lives: the mark that its trainer is alive
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                free = os.statvfs(folder)
                raise RuntimeError(
                    f"shared-memory sync needs {nbytes / 2**20:.0f} MB in {folder} and "
                    f"{free.f_bavail * free.f_frsize / 2**20:.0f} MB is free ({e.strerror}): lower "
                    "sync.bucket_mb, give the container more shared memory (docker --shm-size), or use "
                    "sync.transport group or disk") from e
            self.flat = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)
        except BaseException:
            os.unlink(self.path)
            os.close(fd)
            raise

    def handle(self) -> dict[str, Any]:
        """JSON-able and plain data: {"kind": "shm", "path", "nbytes"} or {"kind": "cuda", "uuid",
        "nbytes", and the CUDA IPC export's fields} (exported once per buffer, after this call has
        waited for the copies into it)."""
        if self.device.type == "cpu":
            return {"kind": "shm", "path": self.path, "nbytes": self.nbytes}
        torch.cuda.synchronize(self.device)  # the copies into flat are done before a worker reads it
        if self._export is None:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor  # noqa: PLC0415
            _, args = reduce_tensor(self.flat)
            fields = dict(zip(inspect.signature(rebuild_cuda_tensor).parameters, args))
            self._export = {"kind": "cuda", "uuid": _device_uuid(self.device.index or 0), "nbytes": self.nbytes,
                            "event_sync_required": bool(fields["event_sync_required"]),
                            **{k: int(fields[k]) for k in _INTS},
                            **{k: None if fields[k] is None else base64.b64encode(fields[k]).decode() for k in _BYTES}}
        return self._export

    def close(self) -> None:
        self.flat = torch.empty(0, dtype=torch.uint8)
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self.path = ""


def open_shared(handle: dict[str, Any]) -> torch.Tensor:
    """The worker's view of the trainer's buffer (uint8): the /dev/shm file mapped, or the CUDA
    IPC export opened on this process's index of the same GPU. The handle is plain data (no
    pickle), and a path must name one of the trainer's buffer files."""
    kind = handle.get("kind")
    if kind == "shm":
        path, n = str(handle["path"]), int(handle["nbytes"])
        if not os.path.basename(path).startswith(PREFIX):
            raise ValueError(f"{path!r} is not a spyglass weight buffer ({PREFIX}*)")
        if not os.path.isfile(path) or os.path.getsize(path) < n:
            raise RuntimeError(f"shared weight buffer {path!r} is missing or smaller than {n} bytes: the server "
                               "must run on the trainer's host and see its /dev/shm")
        return torch.from_file(path, shared=True, size=n, dtype=torch.uint8)
    if kind == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor  # noqa: PLC0415
        n = int(handle["nbytes"])
        return rebuild_cuda_tensor(
            tensor_cls=torch.Tensor, tensor_size=torch.Size([n]), tensor_stride=(1,), tensor_offset=0,
            storage_cls=torch.storage.TypedStorage, dtype=torch.uint8, storage_device=_local_index(str(handle["uuid"])),
            requires_grad=False, event_sync_required=bool(handle["event_sync_required"]),
            **{k: int(handle[k]) for k in _INTS},
            **{k: None if handle[k] is None else base64.b64decode(handle[k]) for k in _BYTES})
    raise ValueError(f"unknown shared weight buffer kind {kind!r} (expected 'shm' or 'cuda')")


class ShareSender:
    """Trainer rank 0's end of the "ipc" transport over `servers` (backends with
    `receive_shared`): the same open / send / close as GroupSender, so `stream_update` drives
    either. A failed or timed-out call raises naming the server and frees the buffer (a worker
    still reading it never sees the next update's bytes). A CUDA buffer is also freed after each
    update's last bucket; the /dev/shm file is kept for the next update."""

    def __init__(self, cfg: Any, servers: list[Any], device: Optional[torch.device] = None) -> None:
        self.cfg, self.servers = cfg, servers
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        self.buffer: Optional[SharedBuffer] = None
        self.keep = self.device.type == "cpu"  # the buffer outlives an update (else freed after its last bucket)
        self.bytes_sent, self.seconds = 0, 0.0

    async def open(self) -> None:
        """Nothing to join: the buffer is made at the first bucket (sized to it)."""

    def _free(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def _room(self, nbytes: int) -> SharedBuffer:
        if self.buffer is None or self.buffer.nbytes < nbytes:
            self._free()  # a bucket's alignment padding can pass bucket_bytes: a quarter's headroom
            size = -(-max(nbytes, self.cfg.bucket_bytes * 5 // 4) // ALIGN) * ALIGN
            self.buffer = SharedBuffer(size, self.device)
        return self.buffer

    async def send(self, bucket: Any, version: int, last: bool) -> None:
        """Pack one bucket and have every server load it; returns once all have."""
        from spyglass.trainer.weight_sync import await_servers  # noqa: PLC0415
        t0 = time.perf_counter()
        offsets, total = layout(bucket.tensors)
        buf = self._room(total)
        pack(buf.flat, bucket.tensors, offsets)
        meta = {**bucket.meta(), "offsets": offsets, "handle": buf.handle()}
        calls = [(s, s.receive_shared(meta, version, last, timeout_s=self.cfg.timeout_s)) for s in self.servers]
        try:
            await await_servers(f"weight update v{version} through shared memory ({len(bucket.names)} tensors)",
                                calls, self.cfg.timeout_s)
        except BaseException:
            self._free()
            raise
        if last and not self.keep:  # colocated training gets the GPU memory back until the next update
            self._free()
        self.bytes_sent += bucket.nbytes
        self.seconds += time.perf_counter() - t0

    async def close(self) -> None:
        self._free()


__all__ = ["ALIGN", "PREFIX", "SharedBuffer", "ShareSender", "layout", "open_shared", "pack", "unpack"]
