"""DeepSpeed ZeRO-2/3 on 2 CPU ranks (gloo) vs the single-process path; weight sync to backends.

    .venv/bin/python -m pytest -q tests/test_distributed.py

The 2-rank part runs this file as a torchrun worker in a subprocess with a bounded timeout
(the first DeepSpeed use on a machine JIT-compiles its CPU shm comm op, ~40 s, cached after).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_update import fresh, make_batch, weights  # noqa: E402

from spyglass.trainer.distributed import free_port  # noqa: E402
from spyglass.trainer.update import NonFiniteError, PolicyUpdater, UpdateConfig  # noqa: E402

# eps 1e-2: Adam's first steps are ~lr*g/(|g|+eps), so float noise in near-zero gradients is not
# amplified to +-lr (sign); clipping at 0.3 is active (grad norms here are ~0.5)
CFG = dict(lr=1e-2, eps=1e-2, grad_clip=0.3, micro_batch_tokens=200, mini_batches=2)
STEPS = 2


def _data():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=6, text_only=(1, 4))  # text-only ones: the dummy-image row
    return v, trajs, adv, masks


# ------------------------------------------------------------------------------ worker (torchrun)
@contextlib.contextmanager
def _spy_gathers() -> Iterator[list[tuple[int, int]]]:
    """Within the block, record (fp32 bytes, tensors) of every deepspeed.zero.GatheredParameters call."""
    import deepspeed
    dz, orig = deepspeed.zero, deepspeed.zero.GatheredParameters
    sizes: list[tuple[int, int]] = []

    def spy(params, *a, **k):
        ps = params if isinstance(params, (list, tuple)) else [params]
        sizes.append((sum(p.ds_numel for p in ps) * 4, len(ps)))
        return orig(params, *a, **k)
    dz.GatheredParameters = spy
    try:
        yield sizes
    finally:
        dz.GatheredParameters = orig


def _worker(out: Path) -> None:
    from spyglass.trainer.checkpoint import load_checkpoint, save_checkpoint
    from spyglass.trainer.distributed import DistConfig, broadcast_state_dict, export_hf, full_state_dict
    from spyglass.trainer.weight_sync import iter_weight_buckets

    rank = int(os.environ["RANK"])
    report: dict = {}
    for strategy in ("zero2", "zero3"):
        over = {"stage3_param_persistence_threshold": 0} if strategy == "zero3" else {}
        dist = DistConfig(strategy=strategy, backend="gloo", ds_overrides=over)
        v, trajs, adv, masks = _data()
        up = PolicyUpdater(v.model, UpdateConfig(**CFG), image_processor=v.image_processor, dist=dist)
        report[strategy] = [up.step(trajs, adv, masks) for _ in range(STEPS)]
        sd = full_state_dict(up, rank0_only=True)
        # the weight-sync stream: buckets gathered one module group at a time on every rank; each
        # gather's size is recorded, and at each yield nothing may be left gathered
        buckets, held = [], []
        with _spy_gathers() as gathers:
            for b in iter_weight_buckets(up, 64 << 10, torch.float32, torch.device("cpu")):
                buckets.append(b)
                held.append(sum(p.numel() for p in up.model.parameters() if getattr(p, "ds_numel", None) is not None
                                and p.numel() == p.ds_numel and p.ds_numel > 0))
        report[f"{strategy}_gathers"] = gathers
        report[f"{strategy}_held_at_yield"] = max(held, default=0)
        report[f"{strategy}_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in up.model.parameters())
        if rank == 0:
            torch.save({"tensors": {k: v for b in buckets for k, v in zip(b.names, b.tensors)},
                        "sizes": [(b.nbytes, len(b.names)) for b in buckets]}, out / f"buckets_{strategy}.pt")
        else:
            report[f"{strategy}_buckets_off_rank0"] = sum(b is not None for b in buckets)
        if rank == 0:
            torch.save(sd, out / f"{strategy}.pt")
            export_hf(up.model, sd, out / f"export_{strategy}")  # what HTTP servers reload
        # checkpoint round trip under ZeRO: save, one more step; reload into a fresh engine, same step
        save_checkpoint(out / f"ckpt_{strategy}", up)
        up.step(trajs, -adv, masks)
        after = full_state_dict(up)
        v2, *_ = _data()
        up2 = PolicyUpdater(v2.model, UpdateConfig(**CFG), image_processor=v2.image_processor, dist=dist)
        load_checkpoint(out / f"ckpt_{strategy}", up2)
        up2.step(trajs, -adv, masks)
        again = full_state_dict(up2)
        report[f"{strategy}_resume_max_diff"] = max(float((after[k] - again[k]).abs().max()) for k in after)
    # broadcast from rank 0 (several buckets)
    got = broadcast_state_dict(sd if rank == 0 else None, src=0, bucket_bytes=64 << 10)
    torch.save(got, out / f"broadcast_rank{rank}.pt")
    # a NaN gradient: ZeRO-3 skips the step, every rank raises naming the grad norm
    before = full_state_dict(up)
    hook = up.model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    try:
        up.step(trajs, adv, masks)
        report["nan_grad"] = "no error"
    except NonFiniteError as e:
        report["nan_grad"] = str(e)
    hook.remove()
    after = full_state_dict(up)
    report["nan_grad_changed"] = any(not torch.equal(before[k], after[k]) for k in before)
    # a NaN on one rank's micro-batch stops both ranks with a clear error (no hang)
    trajs[3].segments[0].logprobs[1] = float("nan")
    try:
        up.step(trajs, adv, masks)
        report["nan"] = "no error"
    except NonFiniteError as e:
        report["nan"] = str(e)
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------ pytest side
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    return out, reports


@pytest.fixture(scope="module")
def reference():
    v, trajs, adv, masks = _data()
    up = PolicyUpdater(v.model, UpdateConfig(**CFG), image_processor=v.image_processor)
    metrics = [up.step(trajs, adv, masks) for _ in range(STEPS)]
    return weights(v.model), metrics


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_on_two_ranks_matches_single_process(two_ranks, reference, strategy):
    out, reports = two_ranks
    ref_w, ref_m = reference
    got = torch.load(out / f"{strategy}.pt")
    assert set(got) == set(ref_w)
    diff = max(float((got[k] - ref_w[k]).abs().max()) for k in ref_w)
    moved = max(float((ref_w[k] - weights(fresh().model)[k]).abs().max()) for k in ref_w)
    assert diff < 1e-5 < 1e-3 < moved, (diff, moved)
    for r in (0, 1):
        for m, rm in zip(reports[r][strategy], ref_m):
            assert m["micro_batches"] >= 2 * m["optimizer_steps"]  # both ranks had work
            for k in ("loss", "grad_norm", "clip_fraction", "approx_kl", "loss_tokens", "tokens"):
                assert m[k] == pytest.approx(rm[k], rel=1e-4, abs=1e-6), (strategy, r, k)
    assert reports[0][f"{strategy}_resume_max_diff"] < 1e-6


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_weight_sync_buckets_are_the_full_weights(two_ranks, strategy):
    """iter_weight_buckets under ZeRO (gathered bucket by bucket under ZeRO-3, every rank
    joining): rank 0's buckets hold exactly the full state dict (fp32 wire, checkpoint names),
    each within the bucket size unless one tensor alone exceeds it; the other rank gets none."""
    from transformers.core_model_loading import revert_weight_conversion

    out, reports = two_ranks
    got = torch.load(out / f"buckets_{strategy}.pt")
    ref = dict(revert_weight_conversion(fresh().model, torch.load(out / f"{strategy}.pt")))
    assert set(got["tensors"]) == set(ref) and all(torch.equal(got["tensors"][k], ref[k]) for k in ref)
    assert len(got["sizes"]) > 3 and all(n <= 64 << 10 or k == 1 for n, k in got["sizes"])
    assert reports[1][f"{strategy}_buckets_off_rank0"] == 0
    if strategy == "zero3":  # never the whole model on one rank: one bucket's worth gathered at a time
        for r in reports:
            gathers = r["zero3_gathers"]
            assert len(gathers) > 3 and all(n <= 64 << 10 or k == 1 for n, k in gathers), gathers
            assert sum(n for n, _ in gathers) == r["zero3_numel"] * 4  # every parameter gathered once
            assert r["zero3_held_at_yield"] == 0  # released before the next bucket is gathered


def test_export_under_zero3_loads_into_a_backend(two_ranks):
    from spyglass.engine.backends.hf import HFBackend

    out, _ = two_ranks
    ref = torch.load(out / "zero3.pt")

    async def go():
        async with HFBackend.from_model(fresh()) as be:
            await be.update_weights(str(out / "export_zero3"), 1)
            return dict(be.model.state_dict())
    got = asyncio.run(go())
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_broadcast_state_dict_and_nan_stops_every_rank(two_ranks):
    out, reports = two_ranks
    a, b = torch.load(out / "broadcast_rank0.pt"), torch.load(out / "broadcast_rank1.pt")
    ref = torch.load(out / "zero3.pt")
    assert set(a) == set(b) == set(ref) and all(torch.equal(b[k], ref[k]) for k in ref)
    for rep in reports:
        assert "non-finite grad norm" in rep["nan_grad"] and "[term: grad norm]" in rep["nan_grad"], rep["nan_grad"]
        assert rep["nan_grad_changed"] is False
    msgs = [rep["nan"] for rep in reports]
    assert all("non-finite" in m for m in msgs), msgs
    assert sum("policy loss" in m and "'t3'" in m and "[term: policy loss]" in m for m in msgs) == 1, msgs
    assert sum("another rank" in m and "[term: other rank]" in m for m in msgs) == 1, msgs


def test_sync_weights_to_hf_backend_and_http_server(tmp_path):
    from aiohttp import web

    from spyglass.engine.offline import tiny
    from spyglass.engine.backends.base import GenerateRequest, SamplingParams
    from spyglass.engine.backends.hf import HFBackend
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.trainer.distributed import full_state_dict, sleep_backends, sync_weights, wake_backends

    v, trajs, adv, masks = _data()
    served = fresh()  # the generation side holds its own copy of the initial weights
    prompt = trajs[0].prompt_ids.tolist()
    up = PolicyUpdater(v.model, UpdateConfig(lr=3e-2), image_processor=v.image_processor)
    for _ in range(3):
        up.step(trajs, adv, masks)
    sd = full_state_dict(up)
    paths: list[str] = []

    async def update(request: web.Request) -> web.Response:
        paths.append((await request.json())["model_path"])
        return web.json_response({"success": True, "message": "ok"})

    async def go():
        app = web.Application()
        app.router.add_post("/update_weights_from_disk", update)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        http = SGLangBackend(SGLangConfig(base_url=f"http://127.0.0.1:{port}"))
        greedy = SamplingParams(max_tokens=16, temperature=0)
        async with HFBackend.from_model(served) as hf:
            req = lambda rid: GenerateRequest(rid, prompt, greedy, images=trajs[0].prompt_images)  # noqa: E731
            before = await hf.generate(req("a"))
            assert await sleep_backends([hf, http]) == [] and await wake_backends([hf]) == []  # no sleep on HF
            path = await sync_weights([hf, http], sd, up.version, model=v.model, export_dir=tmp_path)
            after = await hf.generate(req("b"))
            reloaded = HFBackend.from_model(fresh())
            await reloaded.update_weights(str(path), 1)  # what an HTTP server would load
            await reloaded.close()
        await http.close()
        await runner.cleanup()
        return before, after, hf.version, http.version, path, reloaded

    before, after, hf_version, http_version, path, reloaded = asyncio.run(go())
    assert hf_version == http_version == up.version == 3
    assert after.version == 3 and before.token_ids != after.token_ids
    assert paths == [str(path)] and path.name == "v00000003"
    got = dict(reloaded.model.state_dict())
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert all(torch.equal(p, sd[k]) for k, p in served.model.state_dict().items())


if __name__ == "__main__":  # torchrun worker
    _worker(Path(sys.argv[1]))
