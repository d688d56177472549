"""Internode dispatch and combine (IB once, then NVLink) through moelink.Buffer with
``ranks_per_node`` < the group size: real rank processes posing as nodes, the emulated NIC as the
only way across, checked against moelink.reference (the receive order is the intranode one) on
fresh random routings, node-limited routings, edge cases, SM budgets, tiny queues and schedule
seeds, plus the byte-counter proofs of "once per destination node".

CI: 4 ranks as 2x2 and 4x1, 2 ranks as 2x1; `slow`: 8 ranks as 2x4 and 4x2."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors, reference, runtime
from moelink.reference.dispatch import assert_combine_close
from multiproc import leftover_segments, nic_threads, rank_group_fixture
from test_intranode import _inputs

group = rank_group_fixture(2, 4, case_timeout=300)
group8 = rank_group_fixture(8, name="group8", case_timeout=900)


def _buffer(ctx, ranks_per_node: int, hidden_bytes: int, config: moelink.Config, num_topk: int = 32):
    key = ("internode", ranks_per_node)
    nvl = config.get_nvl_buffer_size_hint(hidden_bytes, ctx.world_size, ranks_per_node=ranks_per_node, num_topk=num_topk)
    rdma = config.get_rdma_buffer_size_hint(hidden_bytes, ctx.world_size, ranks_per_node=ranks_per_node,
                                            num_topk=num_topk)
    buffer = ctx.state.get(key)
    if buffer is None or buffer.num_nvl_bytes < nvl or buffer.num_rdma_bytes < rdma or buffer._unusable:
        if buffer is not None:
            buffer.destroy()
        buffer = moelink.Buffer(ctx.group, nvl, rdma, ranks_per_node=ranks_per_node)
        ctx.state[key] = buffer
    return buffer


def _expected_network_bytes(in_rank, world, rpn, rank, slot_bytes, notify_bytes, agreement_bytes):
    """What this rank's NIC must deliver in a dispatch: one wire message per (token, distinct
    remote destination node), plus one notify message and one barrier put of agreement words
    (docs/semantics.md, "Trust") per rank of another node."""
    nodes = world // rpn
    per_node = in_rank.view(in_rank.shape[0], nodes, rpn).any(dim=2)  # [N, nodes]
    per_node[:, rank // rpn] = False
    return int(per_node.sum()) * slot_bytes + (world - rpn) * (notify_bytes + agreement_bytes)


def _dispatch_and_combine(ctx, seed, case):
    # A case's own schedule applies to it alone; without one, the process's schedule (deterministic,
    # or MOELINK_SIMT_SCHEDULE, which then fuzzes every case) stays (as in test_intranode.py).
    if "schedule" not in case:
        return _check_dispatch_and_combine(ctx, seed, case)
    with runtime.scheduled(case["schedule"]):
        return _check_dispatch_and_combine(ctx, seed, case)


def _check_dispatch_and_combine(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    rpn = case["ranks_per_node"]
    config = moelink.Config(case.get("num_sms", 4), case.get("send_chunk", 6), case.get("queue", 64),
                            case.get("rdma_chunk", 4), case.get("rdma_queue", 32))
    xs, idx, weights, num_experts = _inputs(seed, world, case)
    if case.get("node_limited"):  # DeepSeek-V3 routing with groups = nodes
        gen = torch.Generator().manual_seed(seed + 7)
        nodes = world // rpn
        for r in range(world):
            scores = torch.rand(xs[r].shape[0] if not isinstance(xs[r], tuple) else xs[r][0].shape[0], num_experts,
                                generator=gen)
            idx[r], weights[r] = moelink.routing.node_limited_topk(scores, case["num_topk"], nodes,
                                                                   case["node_limited"])
    hidden = case["hidden"]
    buffer = _buffer(ctx, rpn, hidden * 2, config)
    x, topk_idx, topk_weights = xs[rank], idx[rank], weights[rank]
    alignment, worst = case.get("expert_alignment", 1), case.get("num_worst_tokens", 0)

    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    assert per_node is not None and per_node.shape == (world // rpn,)
    buffer.reset_bytes_moved()
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=alignment,
        num_worst_tokens=worst, config=config)
    moved = buffer.bytes_moved()

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

    # Byte-counter proof: the network carries each token once per distinct remote node.
    sizes = moelink._internode.window_sizes(
        num_nodes=world // rpn, ranks_per_node=rpn, num_channels=config.num_sms // 2, block_warps=2,
        nvl_queue_tokens=2, rdma_queue_tokens=2, row_bytes=got_x.shape[1] * got_x.element_size(),
        num_scales=recv_x[1].shape[1] if isinstance(recv_x, tuple) else 0, num_topk=topk_idx.shape[1],
        experts_per_rank=num_experts // world)
    expected_rdma = _expected_network_bytes(in_rank, world, rpn, rank, sizes["dispatch_slot_bytes"],
                                            sizes["notify_bytes"], sizes["agreement_bytes"])
    assert moved["rdma"] == expected_rdma, f"rdma bytes {moved['rdma']} != {expected_rdma}"
    # NVL side: as a forwarder this rank writes one NVL slot per (message, other local rank that gets it).
    epr, node = num_experts // world, rank // rpn
    nvl_copies = 0
    for src in range(rank % rpn, world, rpn):
        for j in range(node * rpn, (node + 1) * rpn):
            if j != rank:
                nvl_copies += int(((idx[src] >= j * epr) & (idx[src] < (j + 1) * epr)).any(dim=1).sum())
    assert moved["nvl"] == nvl_copies * sizes["nvl_slot_bytes"], f"nvl bytes {moved['nvl']}"

    if case.get("cached"):
        again = buffer.dispatch(x, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        assert torch.equal(again[0] if not isinstance(again[0], tuple) else again[0][0], got_x[:m]), "cached recv_x"
        assert torch.equal(again[1], recv_idx[:m]) and torch.equal(again[2], recv_w[:m]), "cached top-k"
        bare = buffer.dispatch(x, handle=handle, config=config)  # DeepEP's benchmarked form: no top-k at all
        assert torch.equal(bare[0] if not isinstance(bare[0], tuple) else bare[0][0], got_x[:m]), "cached, no top-k"
        assert bare[1] is None and bare[2] is None
    if case.get("fp8"):
        return m

    def expert(rows):
        return (rows.float() * 0.5 + 1.0).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed + 1)
    biases = [torch.randn(xx.shape[0], hidden, generator=gen).to(torch.bfloat16) if case.get("bias") else None
              for xx in xs]
    all_dispatched = reference.intranode_dispatch(xs, idx, num_experts, weights)
    outputs = [expert(d.recv_x) for d in all_dispatched]
    returned_w = [d.recv_topk_weights.float() for d in all_dispatched]
    expected = reference.intranode_combine(outputs, all_dispatched, [xx.shape[0] for xx in xs], returned_w, biases)[rank]
    buffer.reset_bytes_moved()
    combined_x, combined_w, _ = buffer.combine(expert(got_x[:m]), handle, topk_weights=recv_w[:m], bias=biases[rank],
                                               config=config)
    moved = buffer.bytes_moved()
    # One bf16 partial per (token, remote node) it went to, and nothing else, crosses back.
    nodes = world // rpn
    partials = 0
    for src in range(world):  # this rank forwards for sources with its local index
        if src % rpn != rank % rpn or src // rpn == rank // rpn:
            continue
        on_my_node = torch.zeros(xs[src].shape[0], dtype=torch.bool)
        for j in range(rpn):
            dst = (rank // rpn) * rpn + j
            epr = num_experts // world
            on_my_node |= ((idx[src] >= dst * epr) & (idx[src] < (dst + 1) * epr)).any(dim=1)
        partials += int(on_my_node.sum())
    barrier_puts = (world - rpn) * sizes["agreement_bytes"]  # the agreement words, one put per remote rank
    assert moved["rdma"] == partials * sizes["partial_slot_bytes"] + barrier_puts, f"combine rdma bytes {moved['rdma']}"
    # Each row goes back over NVL to the forwarder it came through, unless that is this rank.
    own_local = rank % rpn
    via_others = int((all_dispatched[rank].recv_src_rank[:m] % rpn != own_local).sum())
    assert moved["nvl"] == via_others * (hidden * 2 + 4 * topk_idx.shape[1]), f"combine nvl bytes {moved['nvl']}"
    assert_combine_close(combined_x, combined_w, expected, context=f"rank {rank}", partials=nodes)
    return m


def _run(group, seed, **case):
    return group.run(_dispatch_and_combine, seed, case)


def _layouts(group):
    """(ranks_per_node) shapes this group poses as: 2 ranks as 2x1; 4 ranks as 2x2 and 4x1."""
    return [1] if group.world_size == 2 else [2, 1]


@pytest.mark.parametrize("hidden,num_topk,experts_per_rank", [(64, 8, 4), (256, 4, 2), (16, 1, 1), (512, 9, 3)])
def test_random_routings(group, seed, hidden, num_topk, experts_per_rank):
    for rpn in _layouts(group):
        _run(group, seed, ranks_per_node=rpn, hidden=hidden, num_topk=num_topk, experts_per_rank=experts_per_rank)


def test_node_limited_routing(group, seed):
    pytest.importorskip("moelink.routing")
    _run(group, seed, ranks_per_node=_layouts(group)[0], hidden=128, num_topk=4, experts_per_rank=4, node_limited=1)


def test_skewed_sparse_and_empty_ranks(group, seed):
    rpn = _layouts(group)[0]
    _run(group, seed, ranks_per_node=rpn, hidden=96, num_topk=8, experts_per_rank=4, skew=True)
    _run(group, seed, ranks_per_node=rpn, hidden=64, num_topk=4, experts_per_rank=2, sparse=True,
         tokens=[0] + [57] * (group.world_size - 1))
    _run(group, seed, ranks_per_node=rpn, hidden=64, num_topk=4, experts_per_rank=2, tokens=[0] * group.world_size)


@pytest.mark.parametrize("num_sms", [2, 6])
def test_sm_budgets_and_tiny_queues(group, seed, num_sms):
    rpn = _layouts(group)[0]
    _run(group, seed, ranks_per_node=rpn, hidden=64, num_topk=4, experts_per_rank=2, num_sms=num_sms,
         queue=runtime.block_warps(), rdma_queue=2 * runtime.block_warps(), send_chunk=1, rdma_chunk=1, max_tokens=300)


def test_cached_fp8_worst_tokens_alignment_and_bias(group, seed):
    rpn = _layouts(group)[0]
    _run(group, seed, ranks_per_node=rpn, hidden=128, num_topk=8, experts_per_rank=2, cached=True, bias=True)
    _run(group, seed, ranks_per_node=rpn, hidden=256, num_topk=4, experts_per_rank=2, fp8=True)
    _run(group, seed, ranks_per_node=rpn, hidden=64, num_topk=4, experts_per_rank=2, expert_alignment=64,
         tokens=[40] * group.world_size, num_worst_tokens=40 * group.world_size)


@pytest.mark.parametrize("schedule", ["random:31", "random:32:0.5"])
def test_under_random_schedules(group, seed, schedule):
    _run(group, seed, ranks_per_node=_layouts(group)[0], hidden=64, num_topk=4, experts_per_rank=2, queue=16,
         rdma_queue=32, send_chunk=3, rdma_chunk=2, schedule=schedule)


@pytest.mark.slow
@pytest.mark.parametrize("ranks_per_node", [4, 2])
def test_eight_ranks(group8, seed, ranks_per_node):
    _run(group8, seed, ranks_per_node=ranks_per_node, hidden=256, num_topk=8, experts_per_rank=4)


def _absent_rank(ctx):
    """Rank `world - 1` never enters the dispatch: every other rank raises CommTimeout naming it,
    and after destroy no NIC thread and no segment is left."""
    runtime.set_wait_timeout(1.5)
    before = nic_threads()
    config = moelink.Config(4, 4, 32, 4, 32)
    buffer = moelink.Buffer(ctx.group, config.get_nvl_buffer_size_hint(128, ctx.world_size, ranks_per_node=2),
                            config.get_rdma_buffer_size_hint(128, ctx.world_size, ranks_per_node=2), ranks_per_node=2)
    try:
        assert nic_threads() == before + 1, "one NIC thread per Buffer"
        missing = ctx.world_size - 1
        if ctx.rank == missing:
            return "absent"
        topk = torch.zeros(4, 2, dtype=torch.int64)
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
        with pytest.raises(errors.CommTimeout) as info:
            buffer.dispatch(torch.zeros(4, 64, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, config=config)
        with pytest.raises(errors.BufferUnusable):
            buffer.dispatch(torch.zeros(4, 64, dtype=torch.bfloat16), topk_idx=topk, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, config=config)
        return str(info.value)
    finally:
        buffer.destroy()
        runtime.set_wait_timeout(100.0)
        assert nic_threads() == before, "the NIC thread was joined"


def test_absent_rank_times_out_naming_it_and_leaves_nothing(group, seed):
    if group.world_size != 4:
        pytest.skip("needs 2 nodes of 2")
    messages = group.run(_absent_rank, timeout=120)
    missing = group.world_size - 1
    for rank, message in enumerate(messages[:-1]):
        assert f"peer {missing}" in message and "barrier" in message, (rank, message)
    assert messages[-1] == "absent"
    assert leftover_segments(group.shm_tag) == []
