"""moelink.autograd's low-latency functions and DLPack on the low-latency entry points, on 2 and
4 real rank processes (4 as 4x1 and 2x2 nodes, as tests/test_low_latency.py).

Gradients of an expert-parallel layer (LL dispatch -> a linear map per expert -> LL combine) are
compared with the same layer computed in one process (float64 autograd over all ranks' tokens and
every expert), on fresh random routings; the combine's backward is also checked row by row
against its formula. Then double backward, the refused options, NumPy arrays in and out of every
low-latency entry point. Every rank draws the inputs of all ranks from the case's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moelink
from moelink import _low_latency, autograd, errors
from moelink.reference import low_latency as ref
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=300)


def _layouts(world):
    """(ranks_per_node, allow_nvlink): 2 ranks as 2x1; 4 ranks as 4x1 and 2x2."""
    return [(2, False), (2, True)] if world == 2 else [(4, False), (2, True), (2, False)]


def _buffer(ctx, rpn, allow_nvlink, t_max, hidden, experts):
    nbytes = moelink.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, ctx.world_size, experts)
    key = ("ll", rpn, allow_nvlink)
    buffer = ctx.state.get(key)
    if buffer is None or buffer.num_rdma_bytes < nbytes or buffer._unusable:
        if buffer is not None:
            buffer.destroy()
        buffer = moelink.Buffer(ctx.group, 0, nbytes, low_latency_mode=True, ranks_per_node=rpn,
                                allow_nvlink_for_low_latency_mode=allow_nvlink)
        ctx.state[key] = buffer
    return buffer


def _problem(seed, world, case):
    """Every rank's bf16 x, ids (distinct per row, some -1), weights, output gradient; the experts."""
    gen = torch.Generator().manual_seed(seed)
    t_max, hidden, k, experts = case["t_max"], case["hidden"], case["num_topk"], case["experts"]
    xs, idx, weights, grads = [], [], [], []
    for r in range(world):
        n = case["tokens"][r] if "tokens" in case else int(torch.randint(0, t_max + 1, (1,), generator=gen))
        topk = torch.rand(n, experts, generator=gen).topk(k, dim=1).indices
        topk[torch.rand(n, k, generator=gen) < case.get("drop", 0.2)] = -1
        if n and case.get("drop", 0.2):
            topk[0] = -1  # a token that goes nowhere
        xs.append(torch.randn(n, hidden, generator=gen).to(torch.bfloat16))
        idx.append(topk)
        weights.append(torch.rand(n, k, generator=gen))
        grads.append(torch.randn(n, hidden, generator=gen))
    W = torch.randn(experts, hidden, hidden, generator=gen) / hidden ** 0.5
    return xs, idx, weights, W, grads


def _reference(xs, idx, weights, W, grads, combine_idx=None):
    """float64, one process: y[t] = sum_k w[t, k] * x[t] @ W[idx[t, k]] over the slots combined."""
    xs = [x.double().requires_grad_() for x in xs]
    ws = [w.double().requires_grad_() for w in weights]
    W = W.double().requires_grad_()
    ys, loss = [], 0
    for r, (x, i, w, g) in enumerate(zip(xs, idx, ws, grads)):
        used = (combine_idx[r] if combine_idx is not None else i) >= 0
        every = torch.einsum("th,ehj->tej", x, W)  # [N, E, H]: x[t] @ W[e] for every expert
        rows = every.gather(1, i.clamp(min=0).unsqueeze(2).expand(-1, -1, x.shape[1]))
        y = (rows * (w * used)[..., None]).sum(1)
        ys.append(y.detach())
        loss = loss + (y * g.double()).sum()
    loss.backward()
    return ys, [x.grad for x in xs], [w.grad for w in ws], W.grad


def _valid(recv_count, rows):
    return (torch.arange(rows).unsqueeze(0) < recv_count.to(torch.int64).unsqueeze(1)).unsqueeze(2)


def _layer(buffer, x, topk_idx, w, local_W, t_max, experts, weights_in, combine_idx=None):
    """LL dispatch -> per-expert linear on the valid rows -> LL combine (weights on either side)."""
    on_dispatch = weights_in == "dispatch"
    recv_x, recv_count, handle, event, hook = autograd.low_latency_dispatch(
        buffer, x, topk_idx, t_max, experts, topk_weights=w if on_dispatch else None)
    assert hook is None and event is not None and recv_x.dtype == torch.bfloat16
    rows = torch.where(_valid(recv_count, recv_x.shape[1]), recv_x.float(), torch.zeros(()))
    out = torch.bmm(rows, local_W)
    combine_w = torch.ones_like(w) if on_dispatch else w
    ids = topk_idx if combine_idx is None else combine_idx
    y, event, hook = autograd.low_latency_combine(buffer, out, ids, combine_w, handle)
    assert hook is None
    return y, recv_count


def _close(name, got, want, rank, tol=2e-2):
    assert got is not None and tuple(got.shape) == tuple(want.shape), f"{name} on rank {rank}: shape"
    if want.numel() == 0:
        return
    scale = max(float(want.abs().max()), 1e-3)
    err = float((got.detach().double() - want).abs().max())
    assert err <= tol * scale + 1e-6, f"{name} on rank {rank}: max error {err:.3g} vs scale {scale:.3g}"


# A few bf16 roundings (2**-9 each) lie on every term's path (expert output, output gradient, the
# combine's sum, the replay's w * grad, the dispatch weight scaling): each value is checked against
# its own sum of |terms|, so cancellation in a small gradient cannot make the check flaky.
_BF16_PATH = 6 * 2.0 ** -9


def _close_terms(name, got, want, magnitude, rank):
    """|got - want| <= _BF16_PATH * (sum of the |terms| of want), element by element."""
    assert got is not None and tuple(got.shape) == tuple(want.shape), f"{name} on rank {rank}: shape"
    if want.numel() == 0:
        return
    excess = (got.detach().double() - want).abs() - _BF16_PATH * magnitude
    worst = int(excess.flatten().argmax())
    assert float(excess.flatten()[worst]) <= 1e-6, (
        f"{name} on rank {rank}: element {worst}: got {float(got.detach().flatten()[worst]):.6g}, want "
        f"{float(want.flatten()[worst]):.6g}, terms of magnitude {float(magnitude.flatten()[worst]):.3g}")


def _gradients_match(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    t_max, hidden, experts = case["t_max"], case["hidden"], case["experts"]
    el = experts // world
    xs, idx, weights, W, grads = _problem(seed, world, case)
    combine_idx = None
    if case.get("combine_skips"):  # the combine drops some slots the dispatch sent
        gen = torch.Generator().manual_seed(seed + 7)
        combine_idx = [torch.where(torch.rand(i.shape, generator=gen) < 0.3, -1, i) for i in idx]
    ref_y, ref_x, ref_w, ref_W = _reference(xs, idx, weights, W, grads, combine_idx)
    # The same sums with every input replaced by its absolute value: each value's sum of |terms|.
    abs_y, abs_x, abs_w, abs_W = _reference([x.abs() for x in xs], idx, [w.abs() for w in weights], W.abs(),
                                            [g.abs() for g in grads], combine_idx)
    for rpn, allow in _layouts(world)[:case.get("layouts", 3)]:
        buffer = _buffer(ctx, rpn, allow, t_max, hidden, experts)
        x = xs[rank].to(case.get("dtype", torch.bfloat16)).clone().requires_grad_()
        w = weights[rank].clone().requires_grad_()
        local = W[rank * el:(rank + 1) * el].clone().requires_grad_()
        ids = idx[rank].to(case.get("idx_dtype", torch.int64))
        y, recv_count = _layer(buffer, x, ids, w, local, t_max, experts, case.get("weights_in", "combine"),
                               combine_idx[rank] if combine_idx else None)
        want_count = ref.low_latency_dispatch(xs, idx, experts, "bf16")[rank].recv_count
        assert recv_count.tolist() == want_count
        assert y.dtype == torch.bfloat16 and y.shape == (xs[rank].shape[0], hidden)
        _close_terms("y", y, ref_y[rank], abs_y[rank], rank)
        (y.float() * grads[rank]).sum().backward()
        assert x.grad.dtype == x.dtype
        _close_terms("x.grad", x.grad, ref_x[rank], abs_x[rank], rank)
        _close_terms("topk_weights.grad", w.grad, ref_w[rank], abs_w[rank], rank)
        mine = slice(rank * el, (rank + 1) * el)
        _close_terms("expert weights grad", local.grad, ref_W[mine], abs_W[mine], rank)
        assert not buffer._unusable
    return True


_CASES = {
    "weights-in-combine": dict(t_max=16, hidden=128, num_topk=4, experts_per_rank=2),
    "weights-in-dispatch": dict(t_max=16, hidden=128, num_topk=4, experts_per_rank=2, weights_in="dispatch"),
    "fp32-x-int32-ids": dict(t_max=12, hidden=256, num_topk=3, experts_per_rank=3, dtype=torch.float32,
                             idx_dtype=torch.int32, layouts=1),
    "empty-ranks": dict(t_max=10, hidden=128, num_topk=2, experts_per_rank=2, tokens=[0, 7, 0, 10]),
    "all-ranks-empty": dict(t_max=4, hidden=128, num_topk=2, experts_per_rank=1, tokens=[0, 0, 0, 0], layouts=1),
    # Every token of every rank goes to every expert: each expert receives R * N rows.
    "every-expert-from-every-rank": dict(t_max=8, hidden=128, num_topk=0, experts_per_rank=1, drop=0.0,
                                         tokens=[8, 8, 8, 8]),
    "many-minus-one": dict(t_max=16, hidden=128, num_topk=6, experts_per_rank=4, drop=0.6),
    "combine-skips-slots": dict(t_max=12, hidden=128, num_topk=4, experts_per_rank=2, combine_skips=True),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_gradients_match_single_process_layer(group, seed, name):
    world = group.world_size
    case = dict(_CASES[name])
    case["experts"] = case.pop("experts_per_rank") * world
    case["num_topk"] = case["num_topk"] or world
    if "tokens" in case:
        case["tokens"] = (case["tokens"] * 2)[:world]
    assert group.run(_gradients_match, seed, case) == [True] * world


def _combine_backward_formula(ctx, seed):
    """A handle of Buffer.low_latency_dispatch, expert rows as a leaf: grad of row (e, i) from
    (source s, token t, slot k) is w[t, k] * grad_out[t] of s, 0 past recv_count."""
    world, rank = ctx.world_size, ctx.rank
    case = dict(t_max=10, hidden=256, num_topk=3, experts=2 * world)
    xs, idx, weights, _, grads = _problem(seed, world, case)
    buffer = _buffer(ctx, world, True, 10, 256, 2 * world)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(xs[rank], idx[rank], 10, 2 * world, use_fp8=False)
    rows = (recv_x.float() * 2).to(torch.bfloat16).requires_grad_()
    w = weights[rank].clone().requires_grad_()
    y, _, _ = autograd.low_latency_combine(buffer, rows, idx[rank], w, handle)
    (y.float() * grads[rank]).sum().backward()
    for e in range(2):
        for s in range(world):
            v = int(handle[1][e, s])
            for i in range((v >> 32), (v >> 32) + (v & 0xFFFFFFFF)):
                t, k = divmod(int(handle[0][e, i]), 3)
                want = (weights[s][t, k] * grads[s][t].to(torch.bfloat16).float()).to(torch.bfloat16)
                assert torch.equal(rows.grad[e, i], want), (e, i, s, t, k)
        assert not bool(rows.grad[e, int(recv_count[e]):].any()), "rows past recv_count get 0"
    # grad of w[t, k]: <grad_out[t], the row combined for slot (t, k)> (= bf16(2 x[t]) here);
    # grad_out reaches the bf16 output as bf16.
    sent = idx[rank] >= 0
    row_dot = torch.einsum("th,th->t", (2 * xs[rank].float()).to(torch.bfloat16).float(),
                           grads[rank].to(torch.bfloat16).float())
    _close("topk_weights.grad", w.grad, (row_dot.unsqueeze(1) * sent).double(), rank, tol=1e-5)
    # The combine drops a slot the dispatch sent: with this handle (no ids kept) x's gradient would
    # need a replay the handle cannot route, so it is refused before any rank calls a kernel.
    skipped = idx[rank].clone()
    first = sent.nonzero()
    if first.shape[0]:
        skipped[first[0, 0], first[0, 1]] = -1
    with torch.no_grad():  # without a gradient the Buffer's combine takes it
        y2, _, _ = autograd.low_latency_combine(buffer, rows, skipped, w, handle)
    assert y2.shape == y.shape
    if first.shape[0]:
        with pytest.raises(errors.InvalidArgument, match="^topk_idx: expected the dispatch's ids"):
            autograd.low_latency_combine(buffer, rows, skipped, w, handle)
    assert not buffer._unusable
    return True


def test_combine_backward_is_the_weighted_replay(group, seed):
    assert group.run(_combine_backward_formula, seed) == [True] * group.world_size


def _double_backward(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    case = dict(t_max=6, hidden=128, num_topk=2, experts=world, tokens=[5] * world, drop=0.0)
    xs, idx, weights, W, _ = _problem(seed, world, case)
    buffer = _buffer(ctx, world, True, 6, 128, world)
    x = xs[rank].float().requires_grad_()
    w = weights[rank].clone().requires_grad_()
    local = W[rank:rank + 1].clone().requires_grad_()
    y, _ = _layer(buffer, x, idx[rank], w, local, 6, world, "combine")
    (gx,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
    assert torch.isfinite(gx).all()
    refused = "double backward is not supported: the gradient of moelink.autograd.{}'s"
    with pytest.raises(RuntimeError, match=refused.format("low_latency_dispatch")):
        gx.sum().backward()
    recv_x, _, handle, _, _ = autograd.low_latency_dispatch(buffer, x.detach(), idx[rank], 6, world)
    rows = recv_x.detach().requires_grad_()
    out, _, _ = autograd.low_latency_combine(buffer, rows, idx[rank], weights[rank], handle)
    (grows,) = torch.autograd.grad(out.float().square().sum(), rows, create_graph=True)
    with pytest.raises(RuntimeError, match=refused.format("low_latency_combine")):
        grows.float().sum().backward()
    return True


def test_double_backward_raises_a_clear_error(group, seed):
    assert group.run(_double_backward, seed) == [True] * group.world_size


def _refusals(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    case = dict(t_max=6, hidden=128, num_topk=2, experts=2 * world, tokens=[4] * world)
    xs, idx, weights, _, _ = _problem(seed, world, case)
    buffer = _buffer(ctx, world, False, 6, 128, 2 * world)
    x = xs[rank].clone().requires_grad_()
    w = weights[rank].clone().requires_grad_()
    _, _, handle, _, _ = autograd.low_latency_dispatch(buffer, x, idx[rank], 6, 2 * world)
    rows = torch.zeros(2, world * 6, 128, dtype=torch.bfloat16, requires_grad=True)
    d = lambda **o: autograd.low_latency_dispatch(buffer, x, idx[rank], 6, 2 * world, **o)  # noqa: E731
    c = lambda **o: autograd.low_latency_combine(buffer, rows, idx[rank], w, handle, **o)  # noqa: E731
    checks = [
        (lambda: d(use_fp8=True), errors.InvalidArgument, "use_fp8: expected False when a gradient is required"),
        (lambda: d(payload="logfmt10"), errors.InvalidArgument, "payload: expected None when a gradient"),
        (lambda: d(payload="nvfp4"), errors.InvalidArgument, "payload: expected None"),
        (lambda: d(use_fp8=False, round_scale=True), errors.InvalidArgument, "round_scale: expected False"),
        (lambda: d(return_recv_hook=True), errors.InvalidArgument, "return_recv_hook: expected False"),
        (lambda: d(topk_weights=w, use_fp8=True), errors.InvalidArgument, "topk_weights: expected None unless"),
        (lambda: d(handle=handle), errors.InvalidArgument, "options: expected low_latency_dispatch's options"),
        (lambda: autograd.low_latency_dispatch(buffer, (x, x), idx[rank], 6, 2 * world), errors.InvalidType,
         "x: expected a tensor"),
        (lambda: autograd.low_latency_dispatch(buffer, x.detach().to(torch.int32), idx[rank], 6, 2 * world),
         errors.InvalidDType, "x: expected a floating-point dtype"),
        (lambda: c(use_logfmt=True), errors.InvalidArgument, "use_logfmt: expected False when a gradient"),
        (lambda: c(zero_copy=True), errors.InvalidArgument, "zero_copy: expected False"),
        (lambda: c(return_recv_hook=True), errors.InvalidArgument, "return_recv_hook: expected False"),
        (lambda: c(out=torch.empty(4, 128, dtype=torch.bfloat16)), errors.InvalidArgument, "out: expected None"),
        (lambda: autograd.low_latency_combine(buffer, rows, idx[rank], w, tuple(handle)), errors.InvalidType,
         "handle: expected the handle of a low-latency dispatch"),
    ]
    for call, error, text in checks:
        with pytest.raises(error) as info:
            call()
        assert text in str(info.value), (text, str(info.value))
    # Without a gradient every option is the Buffer's: FP8 with a hook, a LogFMT combine.
    with torch.no_grad():
        recv, count, h2, _, hook = autograd.low_latency_dispatch(buffer, x, idx[rank], 6, 2 * world, use_fp8=True,
                                                                 return_recv_hook=True)
        hook()
        codes, scales = recv
        assert codes.dtype == torch.float8_e4m3fn and count.tolist() == \
            ref.low_latency_dispatch(xs, idx, 2 * world, "fp8")[rank].recv_count
        _, _, h3, _, _ = autograd.low_latency_dispatch(buffer, x, idx[rank], 6, 2 * world)
        y, _, _ = autograd.low_latency_combine(buffer, rows, idx[rank], w, h3, use_logfmt=True)
        assert y.shape == (4, 128)
    assert not buffer._unusable  # refused calls run no kernel and never poison
    return True


def test_codecs_hooks_and_bad_arguments_are_refused(group, seed):
    assert group.run(_refusals, seed) == [True] * group.world_size


# ---- DLPack (NumPy) on the low-latency entry points ----------------------------------------

def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint16).numpy()


def _expert(values: torch.Tensor, expert: int) -> torch.Tensor:
    return (values.float() * (0.5 + 0.03125 * expert) + 0.25).to(torch.bfloat16)


def _expert_rows(rows, handle, xs, rank, k):
    """Checks every received row against its source token; returns what expert e makes of it."""
    expert_out = torch.zeros(rows.shape, dtype=torch.bfloat16)
    for e in range(rows.shape[0]):
        for s in range(len(xs)):
            v = int(handle[1][e, s])
            for i in range(v >> 32, (v >> 32) + (v & 0xFFFFFFFF)):
                t = int(handle[0][e, i]) // k
                assert torch.equal(rows[e, i], xs[s][t]), (e, i)
                expert_out[e, i] = _expert(rows[e, i], rank * rows.shape[0] + e)
    return expert_out


def _numpy_low_latency(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    t_max, hidden, k, experts = 8, 256, 3, 2 * world
    xs, idx, weights, _, _ = _problem(seed, world, dict(t_max=t_max, hidden=hidden, num_topk=k, experts=experts))
    buffer = _buffer(ctx, world, True, t_max, hidden, experts)
    cum = np.zeros(2, dtype=np.int32)
    x_np, idx_np, w_np = _bits(xs[rank]), idx[rank].numpy(), weights[rank].numpy()
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x_np, idx_np, t_max, experts, use_fp8=False,
                                                                   cumulative_local_expert_recv_stats=cum)
    assert isinstance(recv_x, np.ndarray) and recv_x.dtype == np.uint16 and recv_x.shape == (2, world * t_max, hidden)
    assert isinstance(recv_count, np.ndarray) and recv_count.dtype == np.int32
    want_count = ref.low_latency_dispatch(xs, idx, experts, "bf16")[rank].recv_count
    assert recv_count.tolist() == want_count and cum.tolist() == want_count  # stats accumulate in place
    expert_out = _expert_rows(torch.from_numpy(recv_x).view(torch.bfloat16), handle, xs, rank, k)
    # The zero-copy combine buffer comes back as a NumPy view of the window (raw bf16 bits).
    send = buffer.get_next_low_latency_combine_buffer(handle)
    assert isinstance(send, np.ndarray) and send.dtype == np.uint16 and send.shape == expert_out.shape
    assert send.__array_interface__["data"][0] == _low_latency.combine_buffer_view(buffer._ll, handle).data_ptr()
    send[...] = _bits(expert_out)
    out_np = np.zeros((xs[rank].shape[0], hidden), dtype=np.uint16)
    combined, _, _ = buffer.low_latency_combine(send, idx_np, w_np, handle, zero_copy=True, out=out_np)
    assert isinstance(combined, np.ndarray) and combined.dtype == np.uint16
    if out_np.size:
        assert combined.__array_interface__["data"][0] == out_np.__array_interface__["data"][0]
    y = torch.zeros(xs[rank].shape[0], k, hidden, dtype=torch.bfloat16)
    for t in range(xs[rank].shape[0]):
        for j in range(k):
            if int(idx[rank][t, j]) >= 0:
                y[t, j] = _expert(xs[rank][t], int(idx[rank][t, j]))
    want = ref.low_latency_combine(y, idx[rank], weights[rank])
    assert np.array_equal(combined, _bits(want)) and np.array_equal(out_np, _bits(want))
    # FP8 from NumPy: the (codes, scales) pair comes back as NumPy arrays (codes as raw uint8).
    (codes, scales), _, _, _, _ = buffer.low_latency_dispatch(x_np, idx_np, t_max, experts)
    assert codes.dtype == np.uint8 and isinstance(scales, np.ndarray) and scales.dtype == np.float32
    # moelink.autograd: NumPy in, torch out (the graph lives in torch).
    recv, count, h, _, _ = autograd.low_latency_dispatch(buffer, x_np, idx_np, t_max, experts)
    assert isinstance(recv, torch.Tensor) and count.tolist() == want_count
    combined_t, _, _ = autograd.low_latency_combine(buffer, _bits(_expert_rows(recv, h, xs, rank, k)), idx_np, w_np, h)
    assert isinstance(combined_t, torch.Tensor) and torch.equal(combined_t, want)
    return True


def test_low_latency_entry_points_with_numpy(group, seed):
    assert group.run(_numpy_low_latency, seed) == [True] * group.world_size


def test_low_latency_entry_points_are_wrapped():
    for fn in (moelink.Buffer.low_latency_dispatch, moelink.Buffer.low_latency_combine,
               autograd.low_latency_dispatch, autograd.low_latency_combine):
        assert getattr(fn, "__moelink_accepts_arrays__", False), fn
