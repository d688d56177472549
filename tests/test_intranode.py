"""Intranode dispatch and combine through moelink.Buffer, on 2 and 4 real rank processes, against
moelink.reference on fresh random routings, edge cases, SM budgets, tiny queues and schedule seeds.

Every rank draws the inputs of *all* ranks from the case's seed, so it can compute the global
reference itself and check its own outputs."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import moelink
from moelink import errors, reference, runtime
from moelink.reference.dispatch import assert_combine_close
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=240)
group8 = rank_group_fixture(8, name="group8", case_timeout=600)


# ---- helpers running inside the ranks ----------------------------------------------------------

def _buffer(ctx, num_nvl_bytes: int = 1 << 24) -> moelink.Buffer:
    buffer = ctx.state.get("buffer")
    if buffer is None or buffer.num_nvl_bytes < num_nvl_bytes or buffer._unusable:
        if buffer is not None:
            buffer.destroy()
        buffer = moelink.Buffer(ctx.group, num_nvl_bytes)
        ctx.state["buffer"] = buffer
    return buffer


def _inputs(seed, world, case):
    """Every rank's inputs for one case: x, topk_idx, topk_weights per rank."""
    gen = torch.Generator().manual_seed(seed)
    hidden, num_topk, num_experts = case["hidden"], case["num_topk"], case["experts_per_rank"] * world
    xs, idx, weights = [], [], []
    for r in range(world):
        n = case["tokens"][r] if "tokens" in case else int(torch.randint(0, case.get("max_tokens", 160), (1,), generator=gen))
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        topk = torch.randint(-1, num_experts, (n, num_topk), generator=gen)
        if case.get("skew"):  # nearly everything to rank 0's experts
            topk = torch.where(torch.rand(n, num_topk, generator=gen) < 0.95, topk % case["experts_per_rank"], topk)
        if case.get("sparse"):
            topk[torch.rand(n, num_topk, generator=gen) < 0.6] = -1
        if case.get("fp8"):
            x = (x.to(torch.float8_e4m3fn), torch.rand(n, (hidden + 127) // 128, generator=gen) + 0.5)
        xs.append(x)
        idx.append(topk)
        weights.append(torch.rand(n, num_topk, generator=gen))
    return xs, idx, weights, num_experts


def _dispatch_and_combine(ctx, seed, case):
    # A case's own schedule applies to it alone; without one, the process's schedule (deterministic,
    # or MOELINK_SIMT_SCHEDULE, which then fuzzes every case) stays.
    if "schedule" not in case:
        return _check_dispatch_and_combine(ctx, seed, case)
    with runtime.scheduled(case["schedule"]):
        return _check_dispatch_and_combine(ctx, seed, case)


def _check_dispatch_and_combine(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    config = moelink.Config(case.get("num_sms", 4), case.get("send_chunk", 6), case.get("queue", 64))
    xs, idx, weights, num_experts = _inputs(seed, world, case)
    hidden = case["hidden"]
    buffer = _buffer(ctx, config.get_nvl_buffer_size_hint(hidden * 2, world))
    x, topk_idx, topk_weights = xs[rank], idx[rank], weights[rank]
    alignment, worst = case.get("expert_alignment", 1), case.get("num_worst_tokens", 0)

    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=alignment, num_worst_tokens=worst,
        config=config)
    event.current_stream_wait()

    want = reference.intranode_dispatch(xs, idx, num_experts, weights, expert_alignment=alignment,
                                        num_worst_tokens=worst)[rank]
    m = want.num_recv_tokens
    got_x = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    if case.get("fp8"):
        assert torch.equal(got_x[:m].view(torch.uint8), want.recv_x[0][:m].view(torch.uint8)), "fp8 rows"
        assert torch.equal(recv_x[1][:m], want.recv_x[1][:m]), "fp8 scales"
    else:
        assert torch.equal(got_x[:m], want.recv_x[:m]), "recv_x"
    assert got_x.shape[0] == (worst or m)
    assert torch.equal(recv_idx, want.recv_topk_idx), "recv_topk_idx"
    assert torch.equal(recv_w, want.recv_topk_weights.to(torch.float32)), "recv_topk_weights"
    assert per_expert_list == want.num_recv_tokens_per_expert_list, "num_recv_tokens_per_expert_list"
    assert torch.equal(handle.recv_src_idx.long(), want.recv_src_idx[:m]), "recv_src_idx"

    if case.get("cached"):
        again = buffer.dispatch(x, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        assert torch.equal(again[0] if not isinstance(again[0], tuple) else again[0][0], got_x[:m]), "cached recv_x"
        assert torch.equal(again[1], recv_idx[:m]) and torch.equal(again[2], recv_w[:m]), "cached top-k"

    if case.get("fp8"):
        return m
    # Expert outputs: a deterministic function of the row, so every rank can build everyone's.
    def expert(rows):
        return (rows.float() * 0.5 + 1.0).to(torch.bfloat16)
    bias_kind = case.get("bias")
    gen = torch.Generator().manual_seed(seed + 1)
    biases = []
    for r in range(world):
        n = xs[r].shape[0]
        if bias_kind == "one":
            biases.append(torch.randn(n, hidden, generator=gen).to(torch.bfloat16))
        elif bias_kind == "pair":
            biases.append((torch.randn(n, hidden, generator=gen).to(torch.bfloat16),
                           torch.randn(n, hidden, generator=gen).to(torch.bfloat16)))
        else:
            biases.append(None)
    all_dispatched = reference.intranode_dispatch(xs, idx, num_experts, weights)
    outputs = [expert(d.recv_x) for d in all_dispatched]
    returned_w = [d.recv_topk_weights.float() for d in all_dispatched] if case.get("weights", True) else None
    expected = reference.intranode_combine(outputs, all_dispatched, [xx.shape[0] for xx in xs], returned_w, biases)[rank]
    combined_x, combined_w, _ = buffer.combine(
        expert(got_x[:m]), handle, topk_weights=recv_w[:m] if returned_w is not None else None,
        bias=biases[rank], config=config)
    assert_combine_close(combined_x, combined_w, expected, context=f"rank {rank}")
    return m


def _run(group, seed, **case):
    received = group.run(_dispatch_and_combine, seed, case)
    return received


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,num_topk,experts_per_rank", [(64, 8, 4), (256, 4, 2), (16, 1, 1), (512, 9, 3)])
def test_random_routings(group, seed, hidden, num_topk, experts_per_rank):
    _run(group, seed, hidden=hidden, num_topk=num_topk, experts_per_rank=experts_per_rank)


def test_topk_32_and_deepseek_hidden(group, seed):
    _run(group, seed, hidden=7168, num_topk=32, experts_per_rank=16, max_tokens=24)


@pytest.mark.parametrize("num_sms", [2, 4, 8])
def test_sm_budgets(group, seed, num_sms):
    _run(group, seed, hidden=128, num_topk=6, experts_per_rank=2, num_sms=num_sms)


def test_tiny_queues_wrap_many_times(group, seed):
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, queue=group.world_size, send_chunk=1, max_tokens=300)


def test_skewed_routing_one_rank_gets_nearly_everything(group, seed):
    _run(group, seed, hidden=96, num_topk=8, experts_per_rank=4, skew=True)


def test_tokens_routed_nowhere_and_ranks_without_tokens(group, seed):
    tokens = [0] + [57] * (group.world_size - 1)
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, sparse=True, tokens=tokens)
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, tokens=[0] * group.world_size)


@pytest.mark.parametrize("alignment", [1, 128])
def test_expert_alignment_and_worst_case_rows(group, seed, alignment):
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, expert_alignment=alignment)
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, tokens=[40] * group.world_size,
         num_worst_tokens=40 * group.world_size)


@pytest.mark.parametrize("bias", [None, "one", "pair"])
def test_combine_with_and_without_weights_and_bias(group, seed, bias):
    _run(group, seed, hidden=128, num_topk=4, experts_per_rank=2, bias=bias, weights=bias != "one")


def test_cached_dispatch_equals_fresh_dispatch(group, seed):
    _run(group, seed, hidden=128, num_topk=8, experts_per_rank=2, cached=True)


def test_fp8_payload_travels_as_is(group, seed):
    _run(group, seed, hidden=256, num_topk=4, experts_per_rank=2, fp8=True)


@pytest.mark.parametrize("schedule", ["random:21", "random:22:0.5"])
def test_under_random_schedules(group, seed, schedule):
    _run(group, seed, hidden=64, num_topk=4, experts_per_rank=2, queue=8, send_chunk=3, schedule=schedule)


def _absent_rank(ctx):
    runtime.set_wait_timeout(1.0)
    buffer = _buffer(ctx)
    try:
        if ctx.rank == 1:
            return "skipped"
        topk = torch.zeros(4, 2, dtype=torch.int64)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
        try:
            buffer.dispatch(torch.zeros(4, 16, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
        except errors.CommTimeout as exc:
            message = str(exc)
        else:
            raise AssertionError("dispatch without peer 1 returned")
        with pytest.raises(errors.BufferUnusable, match="create a new Buffer"):
            buffer.dispatch(torch.zeros(4, 16, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
        return message
    finally:
        runtime.set_wait_timeout(100.0)
        buffer.destroy()
        ctx.state.pop("buffer", None)


def test_rank_that_never_dispatches_makes_peers_time_out(group):
    messages = group.run(_absent_rank)
    assert messages[1] == "skipped"
    for rank, message in enumerate(messages):
        if rank != 1:
            assert "intranode notify" in message and "from peer 1" in message and f"rank {rank}" in message, message
    assert group.leftover_segments() == []


def _invalid_calls(ctx):
    buffer = _buffer(ctx)
    topk = torch.zeros(4, 2, dtype=torch.int64)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    good = dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    checks = [
        (dict(x=x.float()[:, :3].contiguous()), errors.InvalidShape, "rows of a positive multiple of 16 bytes"),
        (dict(x=x.to(torch.int32)), errors.InvalidDType, "x: expected dtype"),
        (dict(x=x[None]), errors.InvalidShape, "x: expected a 2-D tensor"),
        (dict(x=x.t().contiguous().t()), errors.InvalidShape, "contiguous"),
        (dict(x=torch.zeros(4 * 16 + 1, dtype=torch.bfloat16)[1:].view(4, 16)), errors.InvalidArgument,
         "x: expected data starting at a 16-byte boundary"),
        (dict(topk_idx=topk.to(torch.int16)), errors.InvalidDType, "topk_idx: expected dtype torch.int64 or torch.int32"),
        (dict(topk_idx=topk + 2 * ctx.world_size), errors.InvalidArgument, "topk_idx: expected expert ids"),
        (dict(topk_idx=None), errors.InvalidArgument, "topk_idx: expected a tensor"),
        (dict(is_token_in_rank=in_rank[:2]), errors.InvalidShape, "is_token_in_rank: expected shape"),
        (dict(num_tokens_per_expert=per_expert[:-1]), errors.InvalidArgument, "num_experts"),
        (dict(topk_weights=torch.zeros(4, 3)), errors.InvalidShape, "topk_weights: expected shape (4, 2)"),
        (dict(expert_alignment=0), errors.InvalidArgument, "expert_alignment: expected an int >= 1"),
        (dict(config="fast"), errors.InvalidType, "config: expected a moelink.Config"),
        (dict(x=(x.to(torch.float8_e4m3fn), torch.zeros(3, 7))), errors.InvalidShape, "scales"),
        (dict(handle=object()), errors.InvalidType, "handle: expected a handle returned by Buffer.dispatch"),
    ]
    for overrides, error, text in checks:
        kwargs = dict(good, x=x)
        kwargs.update(overrides)
        with pytest.raises(error, match=None) as info:
            buffer.dispatch(**kwargs)
        assert text in str(info.value), (text, str(info.value))
    small = moelink.Buffer(ctx.group, 4096)
    try:
        with pytest.raises(errors.InvalidArgument, match="num_nvl_bytes: expected at least"):
            small.dispatch(x, **good)
    finally:
        small.destroy()
    return True


def test_invalid_arguments_raise_typed_errors_on_every_rank(group):
    assert group.run(_invalid_calls) == [True] * group.world_size


def _killed_mid_operation(ctx):
    import signal

    runtime.set_wait_timeout(1.0)
    buffer = _buffer(ctx)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    topk = torch.zeros(4, 2, dtype=torch.int64)
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
    with pytest.raises(errors.CommTimeout):
        buffer.dispatch(torch.zeros(4, 16, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert)
    return True


def test_killed_rank_leaks_no_shared_memory(group):
    from multiproc import RankCrashed

    with pytest.raises(RankCrashed):
        group.run(_killed_mid_operation, grace_s=20)
    assert group.leftover_segments() == []


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    dict(hidden=256, num_topk=8, experts_per_rank=4),
    dict(hidden=64, num_topk=8, experts_per_rank=2, queue=8, send_chunk=2, schedule="random:31"),
    dict(hidden=128, num_topk=8, experts_per_rank=2, num_sms=8, cached=True, bias="pair"),
])
def test_eight_ranks(group8, seed, case):
    _run(group8, seed, **case)


def _deepep_style(ctx):
    """The call sequence of DeepEP's README (normal kernels), with only the import changed."""
    import moelink as deep_ep

    deep_ep.Buffer.set_num_sms(4)
    try:
        num_nvl_bytes = deep_ep.Buffer.get_dispatch_config(ctx.world_size).get_nvl_buffer_size_hint(64 * 2, ctx.world_size)
        with deep_ep.Buffer(ctx.group, num_nvl_bytes, 0) as buffer:
            gen = torch.Generator().manual_seed(7 + ctx.rank)
            x = torch.randn(33, 64, generator=gen).to(torch.bfloat16)
            topk_idx = torch.randint(0, 4 * ctx.world_size, (33, 2), generator=gen)
            topk_weights = torch.rand(33, 2, generator=gen)
            num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
                buffer.get_dispatch_layout(topk_idx, 4 * ctx.world_size, previous_event=None, async_finish=True,
                                           allocate_on_comm_stream=False)
            recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
                x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
                allocate_on_comm_stream=True)
            event.current_stream_wait()
            combined_x, _, event = buffer.combine(recv_x, handle, async_finish=True, previous_event=event)
            event.current_stream_wait()
    finally:
        deep_ep.Buffer.set_num_sms(moelink.config.DEFAULT_NUM_SMS)
    copies = is_token_in_rank.sum(1, keepdim=True).float()
    assert torch.allclose(combined_x.float(), (x.float() * copies).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    assert sum(num_recv_tokens_per_expert_list) == int((recv_topk_idx >= 0).sum())
    return True


def test_deepep_call_sequence_runs_unchanged(group):
    assert group.run(_deepep_style) == [True] * group.world_size


def _invalid_construction_and_combine(ctx):
    with pytest.raises(errors.InvalidType, match="group: expected a torch.distributed ProcessGroup, got str"):
        moelink.Buffer("world", 1 << 20)
    for kwargs, text in [
        (dict(num_nvl_bytes=-1), "num_nvl_bytes: expected an int >= 0, got -1"),
        (dict(num_nvl_bytes=1 << 20, low_latency_mode=True), "num_rdma_bytes: expected > 0 with low_latency_mode=True"),
        (dict(num_nvl_bytes=1 << 20, ranks_per_node=1), "num_rdma_bytes: expected > 0 for"),
        (dict(num_nvl_bytes=1 << 20, ranks_per_node=3 if ctx.world_size == 4 else 5),
         f"ranks_per_node: expected a divisor of the group size {ctx.world_size}"),
    ]:
        with pytest.raises(errors.InvalidArgument) as info:
            moelink.Buffer(ctx.group, **kwargs)
        assert text in str(info.value)
    with pytest.raises(errors.InvalidArgument, match="new_num_sms: expected an even number, got 3"):
        moelink.Buffer.set_num_sms(3)

    buffer = _buffer(ctx)
    topk = torch.zeros(4, 2, dtype=torch.int64)
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
    config = moelink.Config(4, 4, 32)
    recv_x, _, _, _, handle, _ = buffer.dispatch(torch.ones(4, 16, dtype=torch.bfloat16), topk_idx=topk,
                                                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                 config=config)
    rows = recv_x.shape[0]
    checks = [
        (dict(x=recv_x.float()), errors.InvalidDType, "x: expected dtype torch.bfloat16"),
        (dict(x=torch.zeros(rows + 1, 16, dtype=torch.bfloat16)), errors.InvalidShape, "(the dispatch's rows)"),
        (dict(handle=(1, 2)), errors.InvalidType, "handle: expected a handle returned by Buffer.dispatch"),
        (dict(topk_weights=torch.zeros(rows + 1, 2)), errors.InvalidShape, "topk_weights: expected shape"),
        (dict(bias=torch.zeros(3, 16, dtype=torch.bfloat16)), errors.InvalidShape, "bias[0]: expected shape (4, 16)"),
        (dict(bias=(None, torch.zeros(4, 8, dtype=torch.bfloat16))), errors.InvalidShape, "bias[1]: expected shape"),
        (dict(config=moelink.Config(8, 4, 32)), errors.InvalidArgument, "config: expected num_sms = 4"),
    ]
    for overrides, error, text in checks:
        kwargs = dict(x=recv_x, handle=handle, config=config)
        kwargs.update(overrides)
        with pytest.raises(error) as info:
            buffer.combine(**kwargs)
        assert text in str(info.value), (text, str(info.value))
    combined, _, _ = buffer.combine(recv_x, handle, config=config)  # still usable after refused calls
    assert torch.equal(combined, in_rank.sum(1, keepdim=True).to(torch.bfloat16).expand(4, 16))
    return True


def test_invalid_construction_and_combine_arguments(group):
    assert group.run(_invalid_construction_and_combine) == [True] * group.world_size


# ---- DeepEP semantics frameworks rely on (issue 10 item 4) -----------------------------------

def _fp8_scales_and_int32_ids(ctx, seed, num_scales, layout, scale_dtype, idx_dtype):
    """FP8 pairs with any scale count and strides, float32 or int32 scales forwarded bit for bit
    (NaN patterns included), int32 or int64 ids; checked against the reference."""
    world, rank = ctx.world_size, ctx.rank
    gen = torch.Generator().manual_seed(seed)
    hidden, num_topk, num_experts = 128, 3, 2 * world
    xs, idx, ws = [], [], []
    for _ in range(world):
        n = int(torch.randint(0, 50, (1,), generator=gen))
        codes = torch.randint(0, 256, (n, hidden), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
        if scale_dtype == torch.int32:  # any 32-bit pattern, NaN-like floats included
            scales = torch.randint(-2**31, 2**31 - 1, (n, num_scales), generator=gen, dtype=torch.int32)
        else:
            scales = torch.rand(n, num_scales, generator=gen) + 0.25
        xs.append((codes, scales))
        idx.append(torch.randint(-1, num_experts, (n, num_topk), generator=gen).to(idx_dtype))
        ws.append(torch.rand(n, num_topk, generator=gen))
    codes, scales = xs[rank]
    if layout == "column-major":  # DeepGEMM / SGLang: columns contiguous, tokens padded to 4
        storage = torch.zeros(num_scales, -(-max(scales.shape[0], 1) // 4) * 4, dtype=scale_dtype)
        strided = storage.t()[:scales.shape[0]]
        strided.copy_(scales)
        scales = strided
    buffer = _buffer(ctx)
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx[rank], num_experts)
    (recv_codes, recv_scales), recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        (codes, scales), is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx[rank],
        topk_weights=ws[rank])
    want = reference.intranode_dispatch([(c, s) for c, s in xs], [i.long() for i in idx], num_experts, ws)[rank]
    assert torch.equal(recv_codes.view(torch.uint8), want.recv_x[0].view(torch.uint8))
    assert recv_scales.dtype == scale_dtype and recv_scales.is_contiguous()
    assert torch.equal(recv_scales.view(torch.int32), want.recv_x[1].view(torch.int32)), "scales bit for bit"
    assert recv_idx.dtype == idx_dtype and torch.equal(recv_idx.long(), want.recv_topk_idx)
    assert counts == want.num_recv_tokens_per_expert_list
    again = buffer.dispatch((codes, scales), handle=handle, topk_idx=idx[rank])
    assert torch.equal(again[0][1].view(torch.int32), recv_scales.view(torch.int32)) and again[1].dtype == idx_dtype
    return True


@pytest.mark.parametrize("num_scales,layout,scale_dtype,idx_dtype", [
    (1, "row-major", torch.float32, torch.int64),        # vLLM per-token scales
    (1, "row-major", torch.float32, torch.int32),
    (3, "column-major", torch.float32, torch.int32),      # hidden/128 groups, DeepGEMM layout
    (1, "column-major", torch.int32, torch.int64),        # UE8M0 packed: hidden/512 words
    (5, "row-major", torch.int32, torch.int32),           # any count
])
def test_fp8_scales_of_any_count_stride_and_type(group, seed, num_scales, layout, scale_dtype, idx_dtype):
    assert group.run(_fp8_scales_and_int32_ids, seed, num_scales, layout, scale_dtype, idx_dtype) == [True] * group.world_size


def _handle_as_deep_ep_tuple(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    case = dict(hidden=64, num_topk=4, experts_per_rank=2, max_tokens=90)
    xs, idx, weights, num_experts = _inputs(seed, world, case)
    buffer = _buffer(ctx)
    config = moelink.Config(6, 4, 32)
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx[rank], num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(xs[rank], is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                 topk_idx=idx[rank], config=config)
    assert len(handle) == 6 and len(list(handle)) == 6
    rank_prefix, channel_prefix, recv_channel_prefix, src_idx, is_token_in_rank, send_head = handle
    # expected counts: tokens of each source that reach this rank
    epr = num_experts // world
    sent_here = [int(((i >= rank * epr) & (i < (rank + 1) * epr)).any(1).sum()) for i in idx]
    assert rank_prefix.shape == (world, world) and rank_prefix.dtype == torch.int32
    assert rank_prefix[:, rank].tolist() == list(itertools.accumulate(sent_here))
    assert int(handle[0][-1][rank]) == recv_x.shape[0]
    # the whole matrix (notify exchanges every rank's totals): tokens of s that reach j, prefix over s
    sent = torch.tensor([[int(((i >= j * epr) & (i < (j + 1) * epr)).any(1).sum()) for j in range(world)] for i in idx])
    assert torch.equal(rank_prefix, sent.cumsum(0).to(torch.int32))
    channels, n = 3, xs[rank].shape[0]
    per_channel = -(-n // channels) if n else 0
    for c in range(channels):
        end = min((c + 1) * per_channel, n)
        assert channel_prefix[:, c].tolist() == in_rank[:end].sum(0).tolist()
    starts = [0] + list(itertools.accumulate(sent_here))
    assert recv_channel_prefix.shape == (world, channels)
    assert recv_channel_prefix[:, 0].tolist() == starts[:world]
    assert torch.equal(src_idx, handle.recv_src_idx) and torch.equal(is_token_in_rank, in_rank)
    assert torch.equal(send_head, handle.send_head) and handle[3] is handle.deep_ep_tuple()[3]
    assert bool(((send_head >= 0) == in_rank).all())
    assert "received" in repr(handle)
    return True


def test_handle_reads_as_deep_ep_tuple(group, seed):
    assert group.run(_handle_as_deep_ep_tuple, seed) == [True] * group.world_size


def _combine_padded_rows(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    xs, idx, weights, num_experts = _inputs(seed, world, dict(hidden=64, num_topk=3, experts_per_rank=2, tokens=[20] * world))
    buffer = _buffer(ctx)
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx[rank], num_experts)
    worst = 20 * world
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(xs[rank], is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                      topk_idx=idx[rank], topk_weights=weights[rank], num_worst_tokens=worst)
    m = handle.num_recv_tokens
    padded = recv_x.clone()
    padded[m:] = 7.0  # never read
    full, full_w, _ = buffer.combine(padded, handle, topk_weights=recv_w)
    trimmed, trimmed_w, _ = buffer.combine(recv_x[:m].contiguous(), handle, topk_weights=recv_w[:m].contiguous())
    assert torch.equal(full, trimmed) and torch.equal(full_w, trimmed_w)
    for rows in {m + 1, worst + 1} - {worst}:
        with pytest.raises(errors.InvalidShape, match="rows"):
            buffer.combine(torch.zeros(rows, 64, dtype=torch.bfloat16), handle)
    with pytest.raises(errors.InvalidShape, match="topk_weights"):
        buffer.combine(padded, handle, topk_weights=recv_w[:m].contiguous() if m != worst else recv_w[:1].contiguous())
    if m > 1:  # a cached dispatch cannot pad to fewer rows than the handle received (checked before it starts)
        with pytest.raises(errors.InvalidArgument, match="num_worst_tokens: expected 0 or at least"):
            buffer.dispatch(xs[rank], handle=handle, num_worst_tokens=m - 1)
    assert not buffer._unusable
    return True


def test_combine_accepts_padded_num_worst_tokens_output(group, seed):
    assert group.run(_combine_padded_rows, seed) == [True] * group.world_size


def _buffer_without_window(ctx):
    with moelink.Buffer(ctx.group, 0) as buffer:
        assert buffer.num_nvl_bytes == 0 and buffer.bytes_moved() == {"nvl": 0, "rdma": 0}
        assert buffer.get_local_buffer_tensor(torch.float32).numel() == 0
        topk = torch.zeros(4, 2, dtype=torch.int64)
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
        with pytest.raises(errors.InvalidArgument) as info:
            buffer.dispatch(torch.zeros(4, 16, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
        message = str(info.value)
        assert "num_nvl_bytes: expected at least" in message and "num_nvl_bytes=0" in message and message.endswith("got 0")
        assert buffer._unusable is None  # found before anything ran
    # ranks that disagree (0 here, a size there) all raise instead of waiting for each other
    with pytest.raises(errors.InvalidArgument, match="data_bytes|num_nvl_bytes"):
        moelink.Buffer(ctx.group, 0 if ctx.rank == 0 else 1 << 20)
    return True


def test_buffer_with_zero_nvl_bytes(group):
    assert group.run(_buffer_without_window) == [True] * group.world_size
    assert group.leftover_segments() == []


def _local_buffer_tensor_and_accessors(ctx):
    size = 1 << 20
    with moelink.Buffer(ctx.group, size) as buffer:
        whole = buffer.get_local_buffer_tensor(torch.uint8)
        assert whole.numel() == size and whole.data_ptr() == buffer._windows.peer_ptr(ctx.rank)
        assert buffer.get_local_buffer_tensor(torch.float32, offset=64).numel() == (size - 64) // 4
        view = buffer.get_local_buffer_tensor(torch.int64, torch.Size([2, 3]), offset=8)
        assert view.shape == (2, 3) and view.data_ptr() == whole.data_ptr() + 8
        topk = torch.zeros(4, 2, dtype=torch.int64)
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
        for _ in range(3):
            buffer.dispatch(torch.zeros(4, 16, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, config=moelink.Config(2, 2, 16))
        # it aliases the live window: the control word holds the operations completed, and the
        # barrier slots (after the 192-byte control area) the epoch peers last entered
        window = buffer.get_local_buffer_tensor(torch.int64)
        assert int(window[0]) == 3 and window[24:24 + ctx.world_size].tolist() == [3] * ctx.world_size
        checks = [
            (dict(dtype="float32"), errors.InvalidType, "dtype: expected a torch.dtype"),
            (dict(dtype=torch.float32, offset=2), errors.InvalidArgument, "offset: expected a multiple of 4"),
            (dict(dtype=torch.uint8, offset=size + 1), errors.InvalidArgument, "offset: expected a multiple of 1"),
            (dict(dtype=torch.uint8, offset=-1), errors.InvalidArgument, "offset: expected an int >= 0"),
            (dict(dtype=torch.float32, size=torch.Size([size])), errors.InvalidArgument, "size: expected at most"),
            (dict(dtype=torch.float32, use_rdma_buffer=True), errors.InvalidArgument, "use_rdma_buffer: expected False"),
        ]
        for kwargs, error, text in checks:
            with pytest.raises(error) as info:
                buffer.get_local_buffer_tensor(**kwargs)
            assert text in str(info.value), (text, str(info.value))
        assert buffer.get_comm_stream() is None
    with pytest.raises(errors.BufferUnusable, match="destroyed"):
        buffer.get_local_buffer_tensor(torch.uint8)
    return True


def test_local_buffer_tensor_and_stream_accessors(group):
    assert group.run(_local_buffer_tensor_and_accessors) == [True] * group.world_size


def test_is_sm90_compiled_reports_the_build(monkeypatch):
    from moelink import _backend

    class Stub:
        def __init__(self, archs):
            self.archs = archs

        def build_info(self):
            return {"archs": self.archs}

    for module, expected in ((Stub(["90"]), True), (Stub(["90a", "100a"]), True), (Stub(["100a"]), False), (None, False)):
        monkeypatch.setattr(_backend, "_load_cuda", lambda module=module: module)
        assert moelink.Buffer.is_sm90_compiled() is expected


def _poisoning_phases(ctx):
    """Errors before an operation starts leave the Buffer usable; anything after it starts poisons."""
    # exactly what dispatches of 16 bf16 channels need, so wider rows do not fit
    hint = max(moelink.config.intranode_window_bytes(num_ranks=ctx.world_size, num_channels=1, queue_tokens=16,
                                                     row_bytes=32, num_scales=0, num_topk=2, experts_per_rank=2,
                                                     sub_channels=sub) for sub in range(1, 9))
    topk = torch.zeros(30, 2, dtype=torch.int64)
    with moelink.Buffer(ctx.group, hint) as buffer:
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
        layout = dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                      config=moelink.Config(2, 2, 16))
        with pytest.raises(errors.InvalidArgument, match="num_nvl_bytes: expected at least"):
            buffer.dispatch(torch.zeros(30, 256, dtype=torch.bfloat16), **layout)  # too wide for this window
        with pytest.raises(errors.InvalidDType):
            buffer.dispatch(torch.zeros(30, 16, dtype=torch.int32), **layout)
        recv, _, _, _, handle, _ = buffer.dispatch(torch.ones(30, 16, dtype=torch.bfloat16), **layout)  # still usable
        assert recv.shape[0] == (30 * ctx.world_size if ctx.rank == 0 else 0)
        # after the notify step: rank 0 receives more rows than num_worst_tokens allows
        runtime.set_wait_timeout(2.0)  # rank 0 stops after notify; its peers wait for it in vain
        try:
            with pytest.raises((errors.InvalidArgument, errors.CommTimeout)):
                buffer.dispatch(torch.ones(30, 16, dtype=torch.bfloat16), num_worst_tokens=30 * ctx.world_size - 1
                                if ctx.rank == 0 else 30 * ctx.world_size, **layout)
        finally:
            runtime.set_wait_timeout(100.0)
        with pytest.raises(errors.BufferUnusable, match="create a new Buffer"):
            buffer.dispatch(torch.ones(30, 16, dtype=torch.bfloat16), **layout)
    # a non-moelink exception inside the kernels' phase poisons as well
    with moelink.Buffer(ctx.group, hint) as buffer:
        original = moelink._host.intranode.dispatch

        def failing(*args, **kwargs):
            raise RuntimeError("injected after the notify step")

        moelink._host.intranode.dispatch = failing
        try:
            with pytest.raises(RuntimeError, match="injected"):
                buffer.dispatch(torch.ones(30, 16, dtype=torch.bfloat16), **layout)
        finally:
            moelink._host.intranode.dispatch = original
        assert "RuntimeError" in buffer._unusable
    return True


def test_errors_before_start_never_poison_and_after_start_always_do(group):
    assert group.run(_poisoning_phases, timeout=120) == [True] * group.world_size
