"""The all_to_all_single baseline (moelink.bench.baseline) does the same job as the reference
dispatch and combine: same rows, in the documented receive order, on 2 rank processes; with a
reused BaselineWorkspace it gives the same results across calls and shapes, stops allocating once
it has seen a shape, and takes no page faults for its large buffers in the steady state."""

from __future__ import annotations

import ctypes
import resource

import pytest
import torch

from moelink import errors
from moelink.bench import baseline as baseline_module
from moelink.bench.baseline import BaselineWorkspace, baseline_combine, baseline_dispatch, memcpy_bandwidth
from moelink.reference.dispatch import assert_combine_close, intranode_combine, intranode_dispatch
from multiproc import rank_group_fixture

group = rank_group_fixture(2)


def _inputs(seed, num_ranks, num_experts, num_topk, hidden, tokens, fp8):
    """Every rank's inputs, built identically in every rank from the seed."""
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws, biases = [], [], [], []
    for n in tokens:
        idx = torch.randint(0, num_experts, (n, num_topk), generator=gen)
        idx = idx.masked_fill(torch.rand(n, num_topk, generator=gen) < 0.2, -1)
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        if fp8:
            x = (x.float().to(torch.float8_e4m3fn), torch.rand(n, hidden // 128, generator=gen))
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand(n, num_topk, generator=gen))
        biases.append((torch.randn(n, hidden, generator=gen).to(torch.bfloat16),
                       torch.randn(n, hidden, generator=gen).to(torch.bfloat16)))
    return xs, idxs, ws, biases


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _combine_oracle(expert_out, dispatched, r, num_tokens, bias):
    """Float32, bias first, then every copy of a token in source-rank order (the order the baseline
    and moelink's combine document), rounded once: the exact bits the baseline must produce."""
    acc = torch.zeros(num_tokens, expert_out[0].shape[1], dtype=torch.float32)
    for b in bias:
        acc += b.float()
    for src in range(len(dispatched)):
        d = dispatched[src]
        for row in range(d.num_recv_tokens):
            if int(d.recv_src_rank[row]) == r:
                acc[int(d.recv_src_idx[row])] += expert_out[src][row].float()
    return acc.to(expert_out[0].dtype)


def _compare(ctx, seed, num_experts, num_topk, hidden, tokens, fp8, alignment, reuse=False):
    r = ctx.rank
    xs, idxs, ws, biases = _inputs(seed, ctx.world_size, num_experts, num_topk, hidden, tokens, fp8)
    # reuse: one workspace for every case of this group (shapes change from case to case)
    workspace = ctx.state.setdefault("workspace", BaselineWorkspace()) if reuse else None
    recv_x, recv_idx, recv_w, counts, handle = baseline_dispatch(xs[r], idxs[r], num_experts, ws[r],
                                                                 expert_alignment=alignment, workspace=workspace)
    ref = intranode_dispatch(xs, idxs, num_experts, ws, expert_alignment=alignment)[r]
    if fp8:
        assert torch.equal(_bits(recv_x[0]), _bits(ref.recv_x[0])) and torch.equal(recv_x[1], ref.recv_x[1])
    else:
        assert torch.equal(_bits(recv_x), _bits(ref.recv_x))  # same rows, same order, bit for bit
    assert torch.equal(recv_idx, ref.recv_topk_idx) and torch.equal(recv_w, ref.recv_topk_weights)
    assert counts == ref.num_recv_tokens_per_expert_list

    # Combine what every rank received (as if the experts were the identity), with weights and bias.
    all_recv = intranode_dispatch([x[0].float().to(torch.bfloat16) if fp8 else x for x in xs], idxs, num_experts, ws)
    expert_out = all_recv[r].recv_x
    combined, combined_w = baseline_combine(expert_out, handle, recv_w, bias=biases[r], workspace=workspace)
    expected = intranode_combine([d.recv_x for d in all_recv], all_recv, tokens,
                                 [d.recv_topk_weights for d in all_recv], bias=biases)[r]
    assert_combine_close(combined, combined_w, expected, context=f"rank {r}")
    oracle = _combine_oracle([d.recv_x for d in all_recv], all_recv, r, tokens[r], biases[r])
    assert torch.equal(_bits(combined), _bits(oracle)), "combine: not the float32 sum in source-rank order"
    plain, no_w = baseline_combine(expert_out, handle, workspace=workspace)
    assert no_w is None
    assert_combine_close(plain, None, intranode_combine([d.recv_x for d in all_recv], all_recv, tokens)[r])
    assert torch.equal(_bits(plain), _bits(_combine_oracle([d.recv_x for d in all_recv], all_recv, r, tokens[r], ())))
    return recv_x[0].shape[0] if fp8 else recv_x.shape[0]


@pytest.mark.parametrize("tokens,num_experts,num_topk,hidden,fp8,alignment", [
    ((37, 21), 8, 4, 64, False, 1),
    ((0, 12), 4, 2, 128, False, 4),      # a rank with no tokens
    ((16, 16), 16, 8, 256, True, 1),     # FP8 pair
    ((50, 3), 2, 1, 32, False, 128),     # top-1, one expert per rank
])
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "workspace"])
def test_baseline_matches_reference(group, seed, tokens, num_experts, num_topk, hidden, fp8, alignment, reuse):
    received = group.run(_compare, seed, num_experts, num_topk, hidden, tokens, fp8, alignment, reuse)
    assert len(received) == 2


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _call(x, idx, w, bias, num_experts, workspace):
    """One dispatch and one combine (of the received rows, with weights and bias); returns
    (owned copies of every output, minor page faults the two calls took)."""
    before = _minor_faults()
    recv_x, recv_idx, recv_w, counts, handle = baseline_dispatch(x, idx, num_experts, w, workspace=workspace)
    combined, combined_w = baseline_combine(recv_x, handle, recv_w, bias=bias, workspace=workspace)
    faults = _minor_faults() - before  # before the copies below, which fault pages of their own
    return [t.clone() for t in (recv_x, recv_idx, recv_w, combined, combined_w)] + [counts], faults


def _workspace_reuse(ctx, seed, staging_bytes):
    # Serve every allocation of 64 KiB and more with mmap (glibc's own rule above its threshold,
    # at most 32 MiB by default), so that tiny test shapes show the page faults that fresh
    # buffers of the benchmark's size take; and shrink combine's staging so rows span many chunks.
    ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    saved, baseline_module._STAGING_BYTES = baseline_module._STAGING_BYTES, staging_bytes
    try:
        gen = torch.Generator().manual_seed(seed + ctx.rank)
        shapes = {"big": (256, 1024), "small": (40, 512)}
        inputs = {}
        for name, (n, hidden) in shapes.items():
            inputs[name] = (torch.randn(n, hidden, generator=gen).to(torch.bfloat16),
                            torch.randint(-1, 8, (n, 4), generator=gen), torch.rand(n, 4, generator=gen),
                            torch.randn(n, hidden, generator=gen).to(torch.bfloat16))
        ws = BaselineWorkspace()
        fresh = {name: _call(*inputs[name], 8, None) for name in shapes}
        first, _ = _call(*inputs["big"], 8, ws)
        allocations, nbytes = ws.allocations, ws.nbytes
        steady_faults = []
        for name in ("big", "small", "big", "small", "big"):  # shapes alternate, the workspace does not grow
            outputs, faults = _call(*inputs[name], 8, ws)
            for got, want in zip(outputs, fresh[name][0]):
                assert (got == want if isinstance(got, list) else torch.equal(_bits(got), _bits(want))), name
            assert ws.allocations == allocations and ws.nbytes == nbytes, (name, ws.roles())
            if name == "big":
                steady_faults.append(faults)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(first[:-1], fresh["big"][0][:-1]))
        _, fresh_faults = _call(*inputs["big"], 8, None)
        return {"steady": steady_faults, "fresh": fresh_faults, "roles": ws.roles()}
    finally:
        baseline_module._STAGING_BYTES = saved


def test_workspace_reuse_same_results_no_growth_no_page_faults(group, seed):
    for result in group.run(_workspace_reuse, seed, 8 * 1024):
        assert set(result["roles"]) == {"dispatch.x0.send", "dispatch.x0.recv", "dispatch.idx.recv",
                                        "dispatch.weights.recv", "combine.x.recv", "combine.acc",
                                        "combine.staging", "combine.out", "combine.weights.recv"}
        # A fresh call faults in every page of its large buffers (about 1 600 at this shape); a
        # call reusing the workspace takes about none (a few for small Python and torch objects).
        assert result["fresh"] > 500, result
        assert max(result["steady"]) <= 32, result


def test_workspace_grows_with_headroom_and_views_have_the_requested_shape():
    ws = BaselineWorkspace()
    a = ws.take("r", (3, 4), torch.float32)
    assert a.shape == (3, 4) and a.dtype == torch.float32 and ws.allocations == 1 and ws.nbytes == 48
    b = ws.take("r", (2, 4), torch.bfloat16)  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and ws.allocations == 1
    c = ws.take("r", (4, 4), torch.float32)  # larger: one reallocation, 1/8 headroom
    assert ws.allocations == 2 and ws.nbytes == 64 + 8 and c.shape == (4, 4)
    assert ws.take("r", (0, 4), torch.float32).shape == (0, 4) and ws.allocations == 2
    ws.clear()
    assert ws.nbytes == 0


def test_memcpy_bandwidth():
    rate = memcpy_bandwidth(1 << 20, iters=3, warmup=1)
    assert 1e6 < rate < 1e13  # bytes/s, finite and plausible
    with pytest.raises(errors.InvalidArgument, match="num_bytes"):
        memcpy_bandwidth(0)
