"""Weight sync from trainer rank 0 to generation servers over a torch process group.

One group spans trainer rank 0 (rank 0) and every worker of every server (rank_offset + the
worker's own rank, so tensor-parallel servers work); the trainer and vLLM workers build it with
`init_update_group` (a TCPStore at master_addr:master_port, torch's ProcessGroupGloo /
ProcessGroupNCCL constructed directly on the prefixed stores SGLang's
`init_weights_update_group` uses, so both ends meet), never registered with torch.distributed
and so never split from the trainer's ZeRO group. Each open has its own name
(sync.group_name-port-pid-n; SGLang refuses a name it still holds). An update is a
stream of buckets (`bucket_mb` each, floating tensors cast to the wire dtype, bf16 by
default): per bucket one server call carries (names, dtypes, shapes, version) and rank 0 then
broadcasts the bucket's tensors in that order; the servers load them as they arrive. The
server call blocks until the broadcast, so it is started as a task and awaited together with
the broadcast (run in a thread), under `timeout_s`; a failure names the server.

Server backends that take part implement (duck-typed, see `GroupReceiver`): SGLangBackend
(its real /init_weights_update_group and /update_weights_from_distributed), VLLMHTTPBackend
with dev_mode and VLLMBackend (vLLM's collective_rpc into
`spyglass.engine.backends.vllm_ext.WeightSyncWorker`). Under ZeRO-3 `iter_weight_buckets`
gathers parameters module group by module group up to the bucket size (every trainer rank
joins the gathers; only rank 0 keeps the bucket), so no rank ever holds the whole model.

Transport (`WeightSyncConfig.transport`): "group" sends to every server over the group (a
server that cannot is a config error naming it); "ipc" sends the same buckets through shared
memory to servers colocated in-process (VLLMBackend's `receive_shared`: a /dev/shm file on
CPU, a CUDA IPC handle on the trainer's GPU; trainer/weight_share.py), any other server being a
config error; "disk" writes a HF checkpoint dir that servers reload; "auto" uses ipc for
in-process servers, the group for the other servers that answer its capability probe, and disk
for the rest. In-process backends without the probe (HFBackend) always take the state dict.
NCCL needs CUDA on both ends (a clear error here without it); the gloo path runs on CPU and is
what the tests use:

    .venv/bin/python -m pytest -q tests/test_weight_sync.py
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Protocol

import torch
from torch import nn

from spyglass.engine.backends.vllm import check_worker_ranks  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from spyglass.trainer.weight_share import ShareSender

TRANSPORTS = ("auto", "disk", "group", "ipc")
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GROUP_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class WeightSyncConfig:
    """How the trainer's weights reach the generation servers after each update."""

    transport: str = field(default="auto", metadata={"choices": TRANSPORTS})  # group: a torch process
    #   group to every server's workers; ipc: shared memory (/dev/shm, CUDA IPC) to an in-process vLLM;
    #   disk: a checkpoint dir they reload; auto: ipc where the server is in-process, else group where it can
    bucket_mb: int = 256  # tensors per server call and broadcast round, in MB on the wire
    dtype: str = field(default="bf16", metadata={"choices": tuple(WIRE_DTYPES)})  # floating tensors on the wire
    backend: str = field(default="auto", metadata={"choices": GROUP_BACKENDS})  # auto: nccl with CUDA, else gloo
    master_addr: str = ""  # where the servers reach trainer rank 0; "" = $MASTER_ADDR, else 127.0.0.1
    #   (loopback with a server elsewhere is a config error)
    master_port: int = 0  # the group's TCPStore port on trainer rank 0; 0 = a free port
    group_name: str = "spyglass-weights"  # prefix of the group's name (each open adds -port-pid-n)
    timeout_s: float = 600.0  # bound on opening the group and on each bucket (server call + broadcast)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"sync.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if not isinstance(self.bucket_mb, int) or self.bucket_mb < 1:
            raise ValueError(f"sync.bucket_mb must be an int >= 1, got {self.bucket_mb!r}")
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(f"sync.dtype must be one of {tuple(WIRE_DTYPES)}, got {self.dtype!r}")
        if self.backend not in GROUP_BACKENDS:
            raise ValueError(f"sync.backend must be one of {GROUP_BACKENDS}, got {self.backend!r}")
        if not isinstance(self.master_port, int) or not 0 <= self.master_port < 65536:
            raise ValueError(f"sync.master_port must be in [0, 65536), got {self.master_port!r}")
        if not self.group_name:
            raise ValueError("sync.group_name must be non-empty")
        if not self.timeout_s > 0:
            raise ValueError(f"sync.timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mb << 20

    @property
    def wire_dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.dtype]

    def group_backend(self) -> str:
        """gloo or nccl after "auto"; nccl without CUDA is an error saying so."""
        backend = self.backend if self.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("sync.backend 'nccl' needs CUDA on trainer rank 0 (this machine has none); use 'gloo'")
        return backend


# ------------------------------------------------------------------------------ the group
class UpdateGroup:
    """A weight-update group: torch's ProcessGroupGloo / ProcessGroupNCCL built directly on a
    TCPStore with fresh options, and its collectives called directly. It is never registered
    with torch.distributed, so it is never split from a default group that bound a device
    (DeepSpeed binds one on CUDA; torch then builds new groups with ncclCommSplit from the
    default communicator, which only this rank would call: the first broadcast would hang)."""

    def __init__(self, pg: Any, backend: str, rank: int, world_size: int, store: Any) -> None:
        self.pg, self.backend, self.rank, self.world_size = pg, backend, rank, world_size
        self.store = store  # rank 0 hosts it: it lives as long as the group

    @property
    def device(self) -> torch.device:
        """Where tensors travel: the current CUDA device for nccl, else CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, t: torch.Tensor) -> None:
        """Broadcast `t` from rank 0 (in place on the others); returns once this rank's part is
        enqueued (gloo: done; nccl: ordered before later work on the current stream)."""
        from torch.distributed import BroadcastOptions  # noqa: PLC0415
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([t], opts).wait()

    def abort(self) -> None:
        """Abort the communicator (a blocked NCCL collective returns); the group is unusable."""
        fn = getattr(self.pg, "abort", None)
        if callable(fn):
            try:
                fn()
            except RuntimeError:
                pass

    def close(self) -> None:
        """Leave the group (no collective: a peer that is gone does not block it)."""
        fn = getattr(self.pg, "shutdown", None) if self.backend == "nccl" else None
        if callable(fn):
            try:
                fn()
            except RuntimeError:
                pass


def init_update_group(master_addr: str, master_port: int, rank: int, world_size: int, *,
                      backend: str = "gloo", group_name: str = "spyglass-weights",
                      timeout_s: float = 600.0) -> UpdateGroup:
    """Join the weight-update group (rank 0 hosts the TCPStore at master_addr:master_port). The
    same call on the trainer and in vLLM workers. SGLang builds its end with torch's
    `_new_process_group_helper` over PrefixStore(group_name, store): the stores here are the
    ones that helper uses (PrefixStore "<name>/" then "<device>/"), so both ends meet."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("the weight-update group over NCCL needs CUDA on every member; this process has none")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group's world_size {world_size}")
    from torch.distributed import PrefixStore, TCPStore  # noqa: PLC0415
    timeout = timedelta(seconds=timeout_s)
    # the store itself, not rendezvous("tcp://..."): under torchrun that makes rank 0 a client
    # of the launcher's agent store, and nothing would listen on master_port
    store = TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                     wait_for_workers=False)
    device = "cuda" if backend == "nccl" else "cpu"
    prefixed = PrefixStore(f"{device}/", PrefixStore(f"{group_name}/", PrefixStore(group_name, store)))
    if backend == "gloo":
        from torch.distributed.distributed_c10d import ProcessGroupGloo  # noqa: PLC0415
        pg = ProcessGroupGloo(prefixed, rank, world_size, timeout)
        pg.options.global_ranks_in_group = []
        pg.options.group_name = group_name
    else:
        from torch.distributed import is_nccl_available  # noqa: PLC0415
        if not is_nccl_available():
            raise RuntimeError(f"this torch ({torch.__version__}) has no NCCL: the weight-update group cannot use it")
        from torch.distributed.distributed_c10d import ProcessGroupNCCL  # noqa: PLC0415 - CUDA builds only
        opts = ProcessGroupNCCL.Options()  # fresh: no split_from, no bound device (lazy init)
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.global_ranks_in_group = []
        opts.group_name = group_name
        pg = ProcessGroupNCCL(prefixed, rank, world_size, opts)
    pg._set_sequence_number_for_group()  # as torch's helper does (gloo: rank 0 publishes it in the store)
    return UpdateGroup(pg, backend, rank, world_size, store)


def close_update_group(group: Any) -> None:
    """Leave the group (no collective: a peer that is gone does not block it)."""
    if isinstance(group, UpdateGroup):
        group.close()


def group_device(group: UpdateGroup) -> torch.device:
    """Where tensors travel for `group`: the current CUDA device for nccl, else CPU."""
    return group.device


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as the wire names it ("bfloat16"; SGLang does getattr(torch, name))."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight update")
    return dtype


def receive_bucket(group: UpdateGroup, names: list[str], dtypes: list[str], shapes: list[list[int]],
                   device: Optional[torch.device] = None) -> list[tuple[str, torch.Tensor]]:
    """Server side of one bucket: receive each tensor from rank 0, in order."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"a bucket has {len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
    device = device or group.device
    out = []
    for name, dt, shape in zip(names, dtypes, shapes):
        t = torch.empty(tuple(shape), dtype=parse_dtype(dt), device=device)
        group.broadcast(t)
        out.append((name, t))
    return out


def send_bucket(group: UpdateGroup, tensors: list[torch.Tensor]) -> None:
    """Trainer side of one bucket: broadcast each tensor from rank 0, in order."""
    for t in tensors:
        group.broadcast(t)
    if tensors and tensors[0].is_cuda:  # the bucket may be freed once this returns: NCCL must be done
        torch.cuda.synchronize(tensors[0].device)  # with it (its own device, not this thread's default)


# ------------------------------------------------------------------------------ buckets
@dataclass
class Bucket:
    """Tensors in wire dtype on the group's device, with their checkpoint names."""

    names: list[str]
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def meta(self) -> dict[str, Any]:
        return {"names": self.names, "dtypes": [dtype_name(t.dtype) for t in self.tensors],
                "shapes": [list(t.shape) for t in self.tensors]}


def _wire(t: torch.Tensor, dtype: torch.dtype, device: torch.device, own: bool) -> torch.Tensor:
    """`t` as sent: cast to the wire dtype (floating tensors) on the group's device. `own`: a
    copy even when no cast is needed (a ZeRO-3 gathered parameter is freed after its bucket);
    otherwise an fp32 wire sends the trained tensor itself (only read, and only until the sync
    returns)."""
    t = t.detach()
    out = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
    return out.clone() if own and out.data_ptr() == t.data_ptr() else out


def _checkpoint_names(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bucket under the names a HF checkpoint of `model` uses (transformers' own reverse
    key mapping, e.g. Qwen2-VL's model.language_model.* -> model.*)."""
    if not hasattr(model, "config"):  # not a transformers model: its own names
        return named
    try:
        from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415
    except ImportError:
        return named
    return dict(revert_weight_conversion(model, named))


def _chunks(named: Iterable[tuple[str, torch.Tensor]], limit: int, dtype: torch.dtype,
            device: torch.device, own: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in named:
        n = t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        if bucket and size + n > limit:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = _wire(t, dtype, device, own)
        size += n
    if bucket:
        yield bucket


def iter_weight_buckets(updater: Any, bucket_bytes: int, dtype: torch.dtype,
                        device: torch.device) -> Iterator[Optional[Bucket]]:
    """The trained model's weights as buckets of at most `bucket_bytes` (a tensor larger than
    that is a bucket of its own), floating tensors in `dtype`, on `device`. Every trainer rank
    iterates (under ZeRO-3 each bucket is gathered with a collective); rank 0 gets the buckets,
    the others None. Tied parameters go once (under their first name)."""
    rt = getattr(updater, "runtime", updater)
    model = rt.module.model
    rank0 = rt.rank == 0
    persistent = set(model.state_dict().keys())
    buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
    if rt.stage != 3:
        if not rank0:
            return
        named = list(model.named_parameters()) + buffers  # named_parameters drops tied duplicates
        for b in _chunks(named, bucket_bytes, dtype, device):
            yield _bucket(model, b)
        return
    import deepspeed  # noqa: PLC0415
    groups: list[list[tuple[str, nn.Parameter]]] = [[]]
    size, seen = 0, set()
    for prefix, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.ds_numel * (dtype.itemsize if p.dtype.is_floating_point else p.element_size())
            if groups[-1] and size + n > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append((f"{prefix}.{name}" if prefix else name, p))
            size += n
    for group in groups:
        if not group:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            wire = {name: _wire(p, dtype, device, own=True) for name, p in group} if rank0 else None
        yield _bucket(model, wire) if rank0 else None
    if buffers:
        for b in _chunks(buffers, bucket_bytes, dtype, device) if rank0 else [None]:
            yield _bucket(model, b) if rank0 else None


def _bucket(model: nn.Module, named: dict[str, torch.Tensor]) -> Bucket:
    named = _checkpoint_names(model, named)
    return Bucket(list(named), list(named.values()))


# ------------------------------------------------------------------------------ trainer side
class GroupReceiver(Protocol):
    """What a server backend implements to take weights over the group (SGLangBackend,
    VLLMHTTPBackend with dev_mode, VLLMBackend)."""

    name: str
    version: int

    async def weight_group_size(self) -> int:
        """How many of the server's workers join the group; BackendError if it cannot."""

    async def open_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                                group_name: str, backend: str, timeout_s: float) -> None:
        """Have every worker join (returns once they did)."""

    async def receive_weights(self, meta: dict[str, Any], group_name: str, version: int, last: bool,
                              timeout_s: float) -> None:
        """Receive and load one bucket (returns once loaded); `last`: reset caches, set version."""

    async def close_weight_group(self, group_name: str) -> None:
        """Leave the group."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:  # a name: loopback when it resolves only there (Debian maps its own hostname to 127.0.1.1)
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def group_address(cfg: WeightSyncConfig, servers: Iterable[Any]) -> str:
    """Where the servers reach trainer rank 0: sync.master_addr, else $MASTER_ADDR, else
    127.0.0.1; a loopback address with a server elsewhere is a ConfigError naming both."""
    from urllib.parse import urlparse  # noqa: PLC0415

    from spyglass.engine.config import ConfigError  # noqa: PLC0415
    addr = cfg.master_addr or os.environ.get("MASTER_ADDR", "") or "127.0.0.1"
    if _is_loopback(addr):
        for s in servers:
            url = getattr(getattr(s, "cfg", None), "base_url", "")
            host = urlparse(url).hostname if url else None
            if host and not _is_loopback(host):
                raise ConfigError(f"the weight-update group's address {addr!r} is loopback but server "
                                  f"{getattr(s, 'name', url)!r} is at {url!r}: set sync.master_addr (or "
                                  "MASTER_ADDR) to an address of trainer rank 0 that server can reach")
    return addr


async def probe_group_servers(backends: Iterable[Any], transport: str) -> tuple[list[Any], dict[str, str]]:
    """The backends that take the group (with the disk ones' reasons): "group" requires every
    server backend to, "auto" keeps those whose probe answers, "disk" none."""
    from spyglass.engine.backends.base import BackendError  # noqa: PLC0415
    servers = [b for b in backends if callable(getattr(b, "weight_group_size", None))]
    if transport == "disk":
        return [], {}
    ok, why = [], {}
    sizes = await asyncio.gather(*(b.weight_group_size() for b in servers), return_exceptions=True)
    for b, size in zip(servers, sizes):
        if isinstance(size, BaseException):
            if not isinstance(size, BackendError):
                raise size
            why[b.name] = size.message
        else:
            ok.append(b)
    if transport == "group" and why:
        from spyglass.engine.config import ConfigError  # noqa: PLC0415
        name, reason = next(iter(why.items()))
        raise ConfigError(f"sync.transport 'group': server {name!r} cannot join a weight-update group ({reason})")
    return ok, why


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Any) -> asyncio.Future:
    """`fn()` on a daemon thread, as a future of `loop`: a collective stuck after a failed sync
    neither blocks the event loop nor the interpreter's exit (a pool thread would be joined)."""
    fut = loop.create_future()

    def deliver(value: Any, error: Optional[BaseException]) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            value, error = None, e
        try:
            loop.call_soon_threadsafe(deliver, value, error)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for this any more
            pass

    threading.Thread(target=run, name="spyglass-weight-sync", daemon=True).start()
    return fut


async def await_servers(what: str, calls: list[tuple[Any, Any]], timeout_s: float, local: Any = None) -> None:
    """Await every (server, coroutine) call, and `local()` (rank 0's own blocking collective) on a
    daemon thread when given, under one `timeout_s`; the first failure or the timeout raises a
    BackendError naming the server, and the calls still running are cancelled."""
    from spyglass.engine.backends.base import BackendError  # noqa: PLC0415
    loop = asyncio.get_running_loop()
    tasks = {asyncio.ensure_future(c): be for be, c in calls}
    mine = _in_daemon_thread(loop, local) if local is not None else None
    pending = set(tasks) | ({mine} if mine is not None else set())
    deadline = loop.time() + timeout_s
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0),
                                               return_when=asyncio.FIRST_EXCEPTION)
            if not done:
                slow = [tasks[t].name if t in tasks else "trainer rank 0" for t in pending]
                raise BackendError(slow[0], f"{what}: no answer within sync.timeout_s={timeout_s}s "
                                            f"(still waiting: {sorted(slow)})")
            for t in done:
                if t.exception() is not None:
                    e = t.exception()
                    server = tasks[t].name if t in tasks else "trainer rank 0"
                    if isinstance(e, BackendError):
                        raise e
                    raise BackendError(server, f"{what} failed: {e!r}") from e
    except BaseException:
        for t in tasks:
            t.cancel()
        if mine is not None:
            mine.cancel()
        raise


class Sender(Protocol):
    """One transport's end on trainer rank 0 (GroupSender, weight_share.ShareSender), driven by
    `stream_update`: bytes_sent and seconds (spent in open and send) accumulate over updates."""

    device: torch.device
    bytes_sent: int
    seconds: float

    async def open(self) -> None: ...

    async def send(self, bucket: "Bucket", version: int, last: bool) -> None: ...

    async def close(self) -> None: ...


class GroupSender:
    """Trainer rank 0's end of the group: opened once over `servers`, then one `send` per
    bucket (the update's last one flagged). A failed or timed-out call leaves the group unusable:
    it is aborted and dropped, and the next update opens a new one under a new name (after
    asking the servers, best effort, to destroy the old one)."""

    def __init__(self, cfg: WeightSyncConfig, servers: list[Any]) -> None:
        self.cfg, self.servers = cfg, servers
        self.group: Optional[UpdateGroup] = None
        self.group_name = ""  # this open's name: cfg.group_name + port, pid and a counter
        self.backend = cfg.group_backend()
        self.bytes_sent, self.seconds = 0, 0.0
        self._opens = 0
        self._stale: list[str] = []  # names of dropped groups the servers may still hold

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    async def _together(self, what: str, calls: list[tuple[Any, Any]], local: Any) -> None:
        """The servers' calls and rank 0's own collective together; a failure drops the group."""
        try:
            await await_servers(what, calls, self.cfg.timeout_s, local)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        """A half-done collective leaves the group unusable: abort it (a blocked NCCL call
        returns) and forget it; the thread still in it holds it until that call ends."""
        if self.group is not None:
            self.group.abort()
            self.group = None
        if self.group_name:
            self._stale.append(self.group_name)

    async def open(self) -> None:
        if self.group is not None:
            return
        t0 = time.perf_counter()
        from spyglass.trainer.distributed import free_port  # noqa: PLC0415
        if self._stale:  # best effort: a server that kept a dropped group frees its name
            stale, self._stale = self._stale, []
            await asyncio.gather(*(asyncio.wait_for(s.close_weight_group(n), 30) for s in self.servers
                                   for n in stale), return_exceptions=True)
        sizes = [await s.weight_group_size() for s in self.servers]
        world = 1 + sum(sizes)
        addr = group_address(self.cfg, self.servers)
        port = self.cfg.master_port or free_port()
        self._opens += 1
        name = self.group_name = f"{self.cfg.group_name}-{port}-{os.getpid()}-{self._opens}"
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        box: list[Any] = []
        calls = [(s, s.open_weight_group(addr, port, off, world, name, self.backend, self.cfg.timeout_s))
                 for s, off in zip(self.servers, offsets)]
        await self._together(f"opening weight-update group {name!r} at {addr}:{port}", calls,
                             lambda: box.append(init_update_group(addr, port, 0, world, backend=self.backend,
                                                                  group_name=name, timeout_s=self.cfg.timeout_s)))
        self.group = box[0]
        self.seconds += time.perf_counter() - t0

    async def send(self, bucket: Bucket, version: int, last: bool) -> None:
        """One bucket to every server: their receive calls and the broadcast, together."""
        if self.group is None:
            raise RuntimeError("GroupSender.send before open() (or after a failed sync)")
        t0 = time.perf_counter()
        meta = bucket.meta()
        calls = [(s, s.receive_weights(meta, self.group_name, version, last, timeout_s=self.cfg.timeout_s))
                 for s in self.servers]
        group = self.group
        await self._together(f"weight update v{version} ({len(bucket.names)} tensors)", calls,
                             lambda: send_bucket(group, bucket.tensors))
        self.bytes_sent += bucket.nbytes
        self.seconds += time.perf_counter() - t0

    async def close(self) -> None:
        names = self._stale + ([self.group_name] if self.group is not None else [])
        self._stale = []
        await asyncio.gather(*(asyncio.wait_for(s.close_weight_group(n), 30) for s in self.servers for n in names),
                             return_exceptions=True)
        if self.group is not None:
            self.group.close()
            self.group = None


def empty_bucket() -> Bucket:
    """A bucket with no tensors: closes an update whose weights all went in earlier buckets."""
    return Bucket([], [])


async def stream_update(senders: list[Sender], buckets: Iterable[Optional[Bucket]], version: int) -> float:
    """Send every bucket through each sender in turn (the last bucket flagged, so servers reset
    caches and take `version`); returns the seconds spent. A generator of buckets is advanced
    here (on rank 0)."""
    t0 = time.perf_counter()
    for s in senders:
        await s.open()
    prev: Optional[Bucket] = None
    for b in buckets:
        if b is None:
            continue
        if prev is not None:
            for s in senders:
                await s.send(prev, version, last=False)
        prev = b
    for s in senders:
        await s.send(prev or empty_bucket(), version, last=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ the trainer's sync
@dataclass(frozen=True)
class SyncPlan:
    """Decided on rank 0 at start-up (`WeightSync.prepare`), shared with every rank: whether the
    bucket stream (group, ipc) and the full state dict (disk / in-process) are needed."""

    group: bool
    state_dict: bool
    disk: bool
    ipc: bool = False


def _shares_memory(backend: Any) -> bool:
    return callable(getattr(backend, "receive_shared", None))


class WeightSync:
    """The trainer's weight sync (GRPO's `sync` step), called on every rank after each update:
    the bucket stream goes over the group and/or shared memory (as `transport` decides per
    server), the other servers get a checkpoint dir under `weights_dir` (disk) and in-process HF
    the state dict. Returns metrics: sync/group_s and sync/ipc_s (the whole stream's seconds when
    it has one transport; with both, each one's own sends), sync/group_gb and sync/ipc_gb,
    sync/nccl (1: the group ran NCCL, 0: gloo), sync/disk_s or sync/memory_s; a version already
    synced is skipped (sync/skipped)."""

    def __init__(self, cfg: WeightSyncConfig, backends: list[Any], rank: int, weights_dir: str | os.PathLike) -> None:
        if cfg.transport in ("auto", "group"):
            cfg.group_backend()  # nccl without CUDA: the error now, not after the first update
        self.cfg, self.backends, self.rank, self.weights_dir = cfg, backends, rank, weights_dir
        self.plan: Optional[SyncPlan] = None
        self.sender: Optional[GroupSender] = None
        self.sharer: Optional[ShareSender] = None  # the ipc transport's, for in-process servers
        self.rest: list[Any] = []  # backends served from the state dict (disk or in-process)
        self.synced: Optional[int] = None  # the last version pushed

    async def _decide(self) -> SyncPlan:
        t = self.cfg.transport
        ok, why = await probe_group_servers(self.backends, "auto" if t == "ipc" else t)
        share = [b for b in ok if _shares_memory(b)] if t in ("auto", "ipc") else []
        from spyglass.trainer.distributed import _takes_path  # noqa: PLC0415
        if t == "ipc":  # every server (in-process HF, which takes the state dict, is no server)
            from spyglass.engine.config import ConfigError  # noqa: PLC0415
            for b in self.backends:
                if b not in share and (callable(getattr(b, "weight_group_size", None)) or _takes_path(b)):
                    raise ConfigError(f"sync.transport 'ipc': server {b.name!r} cannot take weights through shared "
                                      "memory (" + why.get(b.name, "only an in-process vLLM engine maps the "
                                                                   "trainer's memory") + ")")
        group = [b for b in ok if b not in share]
        for name, reason in why.items():
            print(f"[sync] {name}: disk ({reason})", flush=True)
        if group:
            group_address(self.cfg, group)  # a loopback address for a remote server: the error now
        self.rest = [b for b in self.backends if b not in ok]
        if group:
            self.sender = GroupSender(self.cfg, group)
        if share:
            from spyglass.trainer.weight_share import ShareSender  # noqa: PLC0415
            self.sharer = ShareSender(self.cfg, share)
        return SyncPlan(bool(group), bool(self.rest), any(_takes_path(b) for b in self.rest), bool(share))

    def prepare(self, loop: asyncio.AbstractEventLoop, broadcast: Any = lambda x: x) -> SyncPlan:
        """Probe the servers (rank 0) and share the plan (every rank calls it): at start-up, so
        a server that cannot take `transport: group` is one config error before any rollout."""
        if self.plan is None:
            self.plan = broadcast(loop.run_until_complete(self._decide()) if self.rank == 0 else None)
        return self.plan

    def __call__(self, updater: Any, version: int, loop: asyncio.AbstractEventLoop,
                 broadcast: Any = lambda x: x) -> dict[str, float]:
        from spyglass.trainer.distributed import full_state_dict, sync_weights  # noqa: PLC0415
        plan = self.prepare(loop, broadcast)
        if version == self.synced:  # a skipped update: the servers already serve these weights
            return {"sync/skipped": 1.0}
        out: dict[str, float] = {}
        if plan.group or plan.ipc:
            t0 = time.perf_counter()
            senders = [s for s in (self.sender, self.sharer) if s is not None]
            device = senders[0].device if senders else torch.device("cpu")
            buckets = iter_weight_buckets(updater, self.cfg.bucket_bytes, self.cfg.wire_dtype, device)
            kinds = ["group"] * plan.group + ["ipc"] * plan.ipc
            if self.rank == 0:
                before = [(s.bytes_sent, s.seconds) for s in senders]
                loop.run_until_complete(stream_update(senders, buckets, version))
                stream_s = time.perf_counter() - t0
                for kind, s, (sent, secs) in zip(kinds, senders, before):  # alone: the whole stream's seconds
                    out[f"sync/{kind}_gb"] = (s.bytes_sent - sent) / 1e9
                    out[f"sync/{kind}_s"] = stream_s if len(senders) == 1 else s.seconds - secs
            else:
                for _ in buckets:  # the ZeRO-3 gathers are collectives every rank joins
                    pass
                out.update({f"sync/{kind}_s": time.perf_counter() - t0 for kind in kinds})
            if plan.group:
                out["sync/nccl"] = float(self.cfg.group_backend() == "nccl")  # which group backend ran: 1 NCCL, 0 gloo
        if plan.state_dict:
            t0 = time.perf_counter()
            sd = full_state_dict(updater, rank0_only=True)
            if self.rank == 0:
                weights = Path(self.weights_dir)
                path = loop.run_until_complete(sync_weights(self.rest, sd, version, model=updater.model,
                                                            export_dir=weights))
                for old in (weights.iterdir() if path is not None else []):
                    if old != path:  # only the newest checkpoint dir is kept
                        shutil.rmtree(old, ignore_errors=True)
            out["sync/disk_s" if plan.disk else "sync/memory_s"] = time.perf_counter() - t0
        self.synced = version
        return out

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sharer is not None:
            loop.run_until_complete(self.sharer.close())
            self.sharer = None
        if self.sender is not None:
            loop.run_until_complete(self.sender.close())
            self.sender = None


__all__ = ["Bucket", "GroupSender", "Sender", "SyncPlan", "UpdateGroup", "WeightSync", "WeightSyncConfig",
           "await_servers", "check_worker_ranks", "close_update_group", "group_address", "init_update_group",
           "iter_weight_buckets", "probe_group_servers", "receive_bucket", "send_bucket", "stream_update"]
