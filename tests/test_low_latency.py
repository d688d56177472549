"""Low-latency dispatch and combine (DeepEP's low-latency mode) through moelink.Buffer: real rank
processes, every transfer through the scale-out transport (the emulated IBGDA NIC) or, with
``allow_nvlink_for_low_latency_mode``, through the node's mapped windows; checked against
moelink.reference.low_latency on fresh random inputs: recv_count, the set of rows each local
expert receives (order inside a source's group is unspecified), each row bit for bit the
reference encoding, its dequantised values within the format's error, the weighted combine bit
for bit, for every payload format; hooks, zero-copy, empty ranks, the maximum token count, many
calls alternating the halves, schedule seeds, the GPU (warp) form of the encoders. The failure
side is in test_low_latency_errors.py.

CI: 2 ranks (2x1), 4 ranks as 4x1 and 2x2; `slow`: 8 ranks."""

from __future__ import annotations

import time

import pytest
import torch

import moelink
from moelink import runtime
from moelink.reference import low_latency as ref
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=300)
group8 = rank_group_fixture(8, name="group8", case_timeout=900)

# Relative error (max |dequant - x| / max |x| per row) each format documents (docs/codecs.md).
_TOLERANCE = {"bf16": 0.0, "fp8": 0.07, "fp8_pow2": 0.13, "fp8_ue8m0": 0.13, "mxfp8": 0.13, "nvfp4": 0.35,
              "logfmt8": 0.1, "logfmt9": 0.06, "logfmt10": 0.03}
_DISPATCH = {"bf16": dict(use_fp8=False), "fp8": {}, "fp8_pow2": dict(round_scale=True),
             "fp8_ue8m0": dict(round_scale=True, use_ue8m0=True), "mxfp8": dict(payload="mxfp8"),
             "nvfp4": dict(payload="nvfp4"), "logfmt8": dict(payload="logfmt8"),
             "logfmt9": dict(payload="logfmt9"), "logfmt10": dict(payload="logfmt10")}


def _inputs(seed, world, case):
    """Every rank's (x, topk_idx, topk_weights): distinct experts per row, some slots -1."""
    gen = torch.Generator().manual_seed(seed)
    t_max, hidden, k, experts = case["t_max"], case["hidden"], case["num_topk"], case["experts"]
    xs, idx, weights = [], [], []
    for r in range(world):
        n = case["tokens"][r] if "tokens" in case else int(torch.randint(0, t_max + 1, (1,), generator=gen))
        x = torch.randn(n, hidden, generator=gen)
        if case.get("outliers"):
            x = torch.where(torch.rand(n, hidden, generator=gen) < 0.01, x * 50, x)
        topk = torch.rand(n, experts, generator=gen).topk(k, dim=1).indices
        topk[torch.rand(n, k, generator=gen) < case.get("drop", 0.1)] = -1
        xs.append(x.to(torch.bfloat16))
        idx.append(topk)
        weights.append(torch.rand(n, k, generator=gen))
    return xs, idx, weights


def _buffer(ctx, rpn, allow_nvlink, nbytes, nvl_bytes=0):
    key = ("ll", rpn, allow_nvlink)
    buffer = ctx.state.get(key)
    if buffer is None or buffer.num_rdma_bytes < nbytes or buffer.num_nvl_bytes < nvl_bytes or buffer._unusable:
        if buffer is not None:
            buffer.destroy()
        buffer = moelink.Buffer(ctx.group, nvl_bytes, nbytes, low_latency_mode=True, ranks_per_node=rpn,
                                allow_nvlink_for_low_latency_mode=allow_nvlink)
        ctx.state[key] = buffer
    return buffer


def _expert(values: torch.Tensor, expert: int) -> torch.Tensor:
    """What expert `expert` returns for bf16 rows: a distinct, exactly reproducible function."""
    return (values.float() * (0.5 + 0.03125 * expert) + 0.25).to(torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t (a fresh dense copy: a size-1 view may keep a stride view() rejects)."""
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1)).view(torch.uint8)


def _rows_of(received, e, i):
    return tuple(part[e][i] for part in received)


def _check_dispatch(ctx, case, xs, idx, recv_x, recv_count, handle, payload):
    """recv_count, the set of (source, token, k) rows per local expert, each row bit for bit."""
    world, rank = ctx.world_size, ctx.rank
    el = case["experts"] // world
    want = ref.low_latency_dispatch(xs, idx, case["experts"], payload)[rank]
    assert recv_count.tolist() == want.recv_count, (recv_count.tolist(), want.recv_count)
    received = recv_x if isinstance(recv_x, tuple) else (recv_x,)
    if payload in ("fp8", "fp8_pow2", "fp8_ue8m0"):
        received = (received[0], received[1])  # scales [EL, rows, G] (a token-major view)
    src_info, layout_range = handle[0], handle[1]
    encoded = [ref.encode_rows(x, payload) if x.shape[0] else None for x in xs]
    rows_for_combine = {}
    for e in range(el):
        got = set()
        for s in range(world):
            v = int(layout_range[e, s])
            count, begin = v & 0xFFFFFFFF, v >> 32
            for i in range(begin, begin + count):
                info = int(src_info[e, i])
                t, k = divmod(info, idx[s].shape[1])
                got.add((s, t, k))
                assert int(idx[s][t, k]) == rank * el + e, (e, s, t, k)
                row = _rows_of(received, e, i)
                expect = tuple(part[t] for part in encoded[s])
                for a, b in zip(row, expect):
                    assert torch.equal(_bits(a), _bits(b)), \
                        f"row of (source {s}, token {t}) at expert {e} row {i}, {payload}"
                rows_for_combine[(e, i)] = ref.dequantize_rows(tuple(p.unsqueeze(0) for p in row), payload,
                                                               case["hidden"])[0]
        assert got == set(want.entries[e]), f"expert {e}: rows differ"
    return rows_for_combine


def _check_accuracy(xs, payload):
    """Dequantised rows within the format's documented error of the inputs."""
    for x in xs:
        if x.shape[0] == 0:
            continue
        values = ref.dequantize_rows(ref.encode_rows(x, payload), payload, x.shape[1]).float()
        scale = x.float().abs().amax(dim=1).clamp_min(1e-6)
        error = ((values - x.float()).abs().amax(dim=1) / scale).max()
        assert error <= _TOLERANCE[payload] + 1e-6, (payload, float(error))


def _await_arrival(buffer, world, xs_counts_to_me, timeout_s=20.0):
    """Polls this rank's signal words (plain words of its scale-out window) until every source's
    counts message and tokens landed: only the NIC thread runs meanwhile."""
    ll = buffer._ll
    words = ll.scaleout.windows.view(ll.rank, 0, 8 * ll.window["num_signals"], torch.int64)
    base, half = ll.window["signal_base"], (ll.calls - 1) % 2
    seen = ll.scaleout.windows.view(ll.rank, ll.window["own_offset"] + 128, 8 * 6 * world, torch.int64)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = True
        for s in range(world):
            count_sig = int(words[base + half * world + s]) - int(seen[half * world + s])
            token_sig = int(words[base + (2 + half) * world + s]) - int(seen[(2 + half) * world + s])
            ok &= count_sig == 1 and token_sig == xs_counts_to_me[s]
        if ok:
            return True
        time.sleep(0.002)
    return False


def _case(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    runtime.set_schedule(case.get("schedule", "deterministic"))
    moelink._low_latency.set_codec_split(case.get("split", "auto"))
    rpn, allow = case.get("rpn", world), case.get("allow_nvlink", True)
    t_max, hidden, experts = case["t_max"], case["hidden"], case["experts"]
    el = experts // world
    size = moelink.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, world, experts)
    buffer = _buffer(ctx, rpn, allow, size)
    cum = torch.zeros(el, dtype=torch.int32)
    total_recv = torch.zeros(el, dtype=torch.int32)
    for it in range(case.get("iterations", 1)):
        xs, idx, weights = _inputs(seed + 1000 * it, world, case)
        payload = case["payloads"][it % len(case["payloads"])]
        hook_mode = case.get("hook", False)
        wait_stats = torch.zeros(world, dtype=torch.int64)
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            xs[rank], idx[rank], t_max, experts, cumulative_local_expert_recv_stats=cum,
            dispatch_wait_recv_cost_stats=wait_stats, return_recv_hook=hook_mode,
            async_finish=case.get("async_finish", False), **_DISPATCH[payload])
        assert event is not None
        if hook_mode:
            assert callable(hook)
            if not allow:  # the data arrives while nothing of this rank runs: no launch, no fiber
                to_me = [int(((idx[s] >= rank * el) & (idx[s] < (rank + 1) * el)).sum()) for s in range(world)]
                before = runtime.stats()
                assert _await_arrival(buffer, world, to_me), "the NIC did not deliver before hook()"
                after = runtime.stats()
                assert after["launches"] == before["launches"] and after["fibers"] == before["fibers"], (before, after)
            hook()
        else:
            assert hook is None
        event.current_stream_wait()
        rows = _check_dispatch(ctx, case, xs, idx, recv_x, recv_count, handle, payload)
        total_recv += recv_count
        assert torch.equal(cum, total_recv), "cumulative_local_expert_recv_stats"
        assert bool((wait_stats >= 0).all())
        if it == 0:
            _check_accuracy(xs, payload)

        # Combine: each local expert returns _expert(dequantised row); the source sums them.
        combine_bits = case.get("combine_logfmt")
        zero_copy = case.get("zero_copy", False) and it % 2 == 0
        expert_out = torch.zeros(el, world * t_max, hidden, dtype=torch.bfloat16)
        for (e, i), values in rows.items():
            expert_out[e, i] = _expert(values, rank * el + e)
        if zero_copy:
            buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
        out = torch.empty(xs[rank].shape[0], hidden, dtype=torch.bfloat16) if case.get("out") else None
        combined, event, hook = buffer.low_latency_combine(
            expert_out, idx[rank], weights[rank], handle, use_logfmt=combine_bits is not None,
            logfmt_bits=combine_bits or 10, zero_copy=zero_copy, return_recv_hook=hook_mode, out=out)
        if hook_mode:
            hook()
        if out is not None:
            assert combined is out
        mine = ref.dequantize_rows(ref.encode_rows(xs[rank], payload), payload, hidden) if xs[rank].shape[0] else \
            torch.zeros(0, hidden, dtype=torch.bfloat16)
        k = idx[rank].shape[1]
        y = torch.zeros(xs[rank].shape[0], k, hidden, dtype=torch.bfloat16)
        for t in range(xs[rank].shape[0]):
            for j in range(k):
                if int(idx[rank][t, j]) >= 0:
                    y[t, j] = _expert(mine[t], int(idx[rank][t, j]))
        want = ref.low_latency_combine(y, idx[rank], weights[rank], combine_bits)
        assert torch.equal(combined, want), f"combine (iteration {it}, payload {payload}, logfmt {combine_bits})"
    return True


def _run(group, seed, **case):
    case.setdefault("experts", 4 * group.world_size)
    return group.run(_case, seed, case)


def _layouts(group):
    """(ranks_per_node, allow_nvlink) shapes: 2 ranks as 2x1; 4 ranks as 4x1 and 2x2."""
    return [(2, False), (2, True)] if group.world_size == 2 else [(4, False), (2, True), (2, False)]


@pytest.mark.parametrize("payload", list(_DISPATCH))
def test_every_payload_format(group, seed, payload):
    for rpn, allow in _layouts(group)[:2]:
        _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=24, hidden=256, num_topk=4, payloads=[payload])


@pytest.mark.parametrize("payload", ["fp8", "fp8_ue8m0", "mxfp8", "nvfp4", "logfmt8"])
def test_gpu_warp_form_of_the_encoders(group, seed, payload):
    """The warp form (the one a GPU runs) of every in-kernel encoder, bit for bit the reference."""
    rpn, allow = _layouts(group)[-1]
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=12, hidden=384, num_topk=3, payloads=[payload],
         combine_logfmt=9, split="warp")


@pytest.mark.parametrize("bits", [8, 9, 10])
def test_logfmt_combine(group, seed, bits):
    rpn, allow = _layouts(group)[0]
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=16, hidden=384, num_topk=6, payloads=["bf16", "fp8"],
         combine_logfmt=bits, iterations=2)


def test_hooks_async_and_zero_copy(group, seed):
    for rpn, allow in _layouts(group):
        _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=20, hidden=128, num_topk=3, payloads=["fp8", "bf16"],
             hook=True, async_finish=True, zero_copy=True, out=True, iterations=2)


def test_many_calls_alternate_halves(group, seed):
    rpn, allow = _layouts(group)[-1]
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=12, hidden=128, num_topk=2,
         payloads=["bf16", "fp8_ue8m0", "nvfp4", "logfmt10", "mxfp8"], iterations=7, zero_copy=True)


def test_empty_ranks_and_maximum_tokens(group, seed):
    world = group.world_size
    rpn, allow = _layouts(group)[0]
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=32, hidden=128, num_topk=8, payloads=["fp8"],
         tokens=[0] + [32] * (world - 1))
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=8, hidden=128, num_topk=4, payloads=["bf16"],
         tokens=[0] * world)
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=16, hidden=128, num_topk=4, payloads=["bf16"],
         tokens=[16] * world, drop=0.0)


def test_large_topk_and_odd_shapes(group, seed):
    rpn, allow = _layouts(group)[-1]
    world = group.world_size
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=5, hidden=640, num_topk=32, experts=16 * world,
         payloads=["fp8", "logfmt9"], iterations=2, outliers=True)
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=3, hidden=128, num_topk=1, experts=world,
         payloads=["nvfp4"])


@pytest.mark.parametrize("schedule", ["random:41", "random:42:0.5"])
def test_under_random_schedules(group, seed, schedule):
    rpn, allow = _layouts(group)[0]
    _run(group, seed, rpn=rpn, allow_nvlink=allow, t_max=10, hidden=128, num_topk=4, payloads=["fp8", "bf16"],
         iterations=2, schedule=schedule)


@pytest.mark.slow
def test_eight_ranks(group8, seed):
    for rpn, allow in [(8, False), (4, True), (2, False)]:
        _run(group8, seed, rpn=rpn, allow_nvlink=allow, t_max=16, hidden=256, num_topk=8,
             payloads=["fp8", "bf16", "nvfp4"], iterations=3, hook=True)



def _weights_replay_and_slot_values(ctx, seed):
    """moelink.autograd's entry points of the kernels (``_low_latency.dispatch`` / ``combine``):
    bf16 rows carrying their weights, stored as w * row by the receiver; a replay into the slots
    of an earlier dispatch (same rows at the same places); the combine's per-slot rows."""
    world, rank = ctx.world_size, ctx.rank
    case = dict(t_max=10, hidden=256, num_topk=3, experts=2 * world)
    xs, idx, weights = _inputs(seed, world, case)
    buffer = _buffer(ctx, world, True, moelink.Buffer.get_low_latency_rdma_size_hint(10, 256, world, 2 * world))
    ll, guard, el = buffer._ll, buffer._operation, 2
    moelink._low_latency.set_codec_split("auto")
    plain, count, handle, _, _ = moelink._low_latency.dispatch(ll, guard, xs[rank], idx[rank], 10, 2 * world,
                                                            use_fp8=False)
    scaled, count2, replay, _, _ = moelink._low_latency.dispatch(
        ll, guard, xs[rank], idx[rank], 10, 2 * world, use_fp8=False, topk_weights=weights[rank], cached=handle,
        scale_by_weight=True)
    assert torch.equal(count, count2) and torch.equal(handle[1], replay[1])
    for e in range(el):  # rows past recv_count are unspecified
        assert torch.equal(handle[0][e, :int(count[e])], replay[0][e, :int(count[e])]), "replayed slots"
    for e in range(el):
        for i in range(int(count[e])):
            s = next(s for s in range(world) if (int(handle[1][e, s]) >> 32) <= i <
                     (int(handle[1][e, s]) >> 32) + (int(handle[1][e, s]) & 0xFFFFFFFF))
            t, k = divmod(int(handle[0][e, i]), 3)
            want = (weights[s][t, k] * xs[s][t].float()).to(torch.bfloat16)
            assert torch.equal(plain[e, i], xs[s][t]) and torch.equal(scaled[e, i], want), (e, i)
    # A token count other than the handle's (0 tokens, or 1 on a rank that had none): refused on
    # every rank before any kernel runs, so no rank is left waiting in a dispatch.
    other = 1 if xs[rank].shape[0] == 0 else 0
    with pytest.raises(moelink.errors.InvalidArgument, match="^cached"):
        moelink._low_latency.dispatch(ll, guard, torch.zeros(other, 256, dtype=torch.bfloat16),
                                      torch.full((other, 3), -1, dtype=torch.int64), 10, 2 * world, use_fp8=False,
                                      cached=handle)
    expert_out = plain.clone()
    slot_values = torch.zeros(xs[rank].shape[0], 3, 256, dtype=torch.bfloat16)
    combined, _, _ = moelink._low_latency.combine(ll, guard, expert_out, idx[rank], weights[rank], replay,
                                               slot_values=slot_values)
    sent = idx[rank] >= 0
    assert torch.equal(slot_values[sent], xs[rank].unsqueeze(1).expand(-1, 3, -1)[sent])
    assert torch.equal(combined, ref.low_latency_combine(xs[rank].unsqueeze(1).expand(-1, 3, -1), idx[rank],
                                                         weights[rank]))
    return True


def test_carried_weights_replay_and_slot_values(group, seed):
    assert all(group.run(_weights_replay_and_slot_values, seed))
