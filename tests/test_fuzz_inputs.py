"""Typed errors for every bad input (docs/semantics.md, "Trust"): a seeded fuzzer over every public
entry point. Each case starts from a valid call and replaces one or two arguments by something
odd (another dtype, shape, strides, device, a 0-D tensor, values >= 2^31, negative or NaN/inf
values, a float where an int belongs, None, a string, a forged or mutated handle); every call must
return or raise a ``moelink.errors`` type: no other exception, no crash (a crash of a rank
process fails the case). Seeds are fixed (``MOELINK_FUZZ_SEED`` picks others, ``MOELINK_FUZZ_CASES``
the cases per entry point) so CI cost stays small."""

from __future__ import annotations

import dataclasses
import os
import random
import traceback

import pytest
import torch

import moelink
from moelink import codecs, errors, routing
from multiproc import rank_group_fixture

SEED = int(os.environ.get("MOELINK_FUZZ_SEED", "1234"))
CASES = int(os.environ.get("MOELINK_FUZZ_CASES", "40"))

one_rank = rank_group_fixture(1, name="one_rank", case_timeout=240, env={"MOELINK_TIMEOUT_S": "10"})
two_nodes = rank_group_fixture(2, name="two_nodes", case_timeout=240, env={"MOELINK_TIMEOUT_S": "10"})

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2]


def _odd_tensor(rng: random.Random, like: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor that differs from `like` in one way (or a random one)."""
    choice = rng.randrange(9)
    base = like if isinstance(like, torch.Tensor) else torch.zeros(3, 4)
    if choice == 0:  # another dtype
        dtype = rng.choice(_DTYPES)
        return torch.zeros(base.shape, dtype=dtype) if dtype.is_floating_point or dtype == torch.complex64 else \
            torch.randint(0, 2, base.shape).to(dtype)
    if choice == 1:  # 0-D
        return torch.tensor(rng.choice([0, 1, -1, 2**40])).to(base.dtype)
    if choice == 2:  # another shape
        shape = [rng.choice([0, 1, 2, 3, 7]) for _ in range(rng.choice([1, 2, 3]))]
        return torch.zeros(shape, dtype=base.dtype)
    if choice == 3 and base.dim() >= 1 and base.numel() > 1:  # non-contiguous, same shape
        wide = torch.zeros((*base.shape[:-1], base.shape[-1] * 2), dtype=base.dtype)
        wide[..., ::2] = base
        return wide[..., ::2]
    if choice == 4:  # another device
        return torch.empty(base.shape, dtype=base.dtype, device="meta")
    if choice == 5 and (base.dtype.is_floating_point):  # NaN / inf payloads
        out = base.clone().float()
        if out.numel():
            out.view(-1)[rng.randrange(out.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38])
        return out.to(base.dtype)
    if choice == 6 and not base.dtype.is_floating_point and base.dtype != torch.bool:  # huge / negative ints
        out = base.clone().to(torch.int64)
        if out.numel():
            out.view(-1)[rng.randrange(out.numel())] = rng.choice([2**31, 2**40, -2, -2**31 - 1, 2**63 - 1])
        return out.to(base.dtype) if base.dtype in (torch.int64,) else out
    if choice == 7:
        return base.float() if base.dtype != torch.float32 else base.to(torch.int64)  # float where int expected
    return base.clone()


def _odd_value(rng: random.Random, like) -> object:
    if isinstance(like, torch.Tensor) and rng.random() < 0.8:
        try:
            return _odd_tensor(rng, like)
        except (RuntimeError, TypeError):  # torch cannot make that one (e.g. an FP8 fill): another value
            return like.clone()
    return rng.choice([None, 0, -1, 1, 3, 2**31, 2**40, -2**31, 2.5, float("nan"), float("inf"), True, "8", [1, 2],
                       torch.tensor(2), torch.tensor(2.0), torch.zeros(2)])


def _fuzz(label: str, rng: random.Random, call, valid: dict, failures: list, cases: int = CASES) -> int:
    """`cases` calls of call(**args), args = `valid` with one or two values made odd."""
    returned = 0
    for case in range(cases):
        args = dict(valid)
        for name in rng.sample(sorted(args), k=min(len(args), rng.choice([0, 1, 1, 1, 2]))):
            args[name] = _odd_value(rng, args[name])
        try:
            call(**args)
            returned += 1
        except errors.MoelinkError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            shown = {k: (f"tensor{tuple(v.shape)} {v.dtype} {v.device} stride {v.stride()}"
                         if isinstance(v, torch.Tensor) else repr(v)) for k, v in args.items()}
            failures.append(f"{label} case {case}: {type(exc).__name__}: {exc}\n  args {shown}\n"
                            + "".join(traceback.format_exception(exc)[-3:]))
    return returned


# ---- local entry points (this process) ---------------------------------------------------------

def _local_entry_points(rng):
    x = torch.randn(4, 128).to(torch.bfloat16)
    q, s = codecs.fp8_quantize(x)
    packed = codecs.logfmt_encode(x, 8)
    mq, ms = codecs.mxfp8_quantize(x)
    gs = codecs.nvfp4_global_scale(x)
    nq, ns = codecs.nvfp4_quantize(x, gs)[:2]
    topk = torch.randint(0, 8, (5, 2))
    scores = torch.rand(5, 8)
    cfg = moelink.Config(4, 4, 32)
    return [
        ("get_dispatch_layout", lambda **a: moelink.get_dispatch_layout(**a),
         dict(topk_idx=topk, num_experts=8, num_ranks=2)),
        ("fp8_quantize", lambda **a: codecs.fp8_quantize(**a), dict(x=x, fmt="e4m3", scale_format="float32")),
        ("fp8_dequantize", lambda **a: codecs.fp8_dequantize(**a), dict(q=q, scales=s, out_dtype=torch.bfloat16)),
        ("logfmt_row_bytes", lambda **a: codecs.logfmt_row_bytes(**a), dict(hidden=128, bits=8)),
        ("logfmt_encode", lambda **a: codecs.logfmt_encode(**a), dict(x=x, bits=8)),
        ("logfmt_decode", lambda **a: codecs.logfmt_decode(**a), dict(packed=packed, hidden=128, bits=8)),
        ("mxfp8_quantize", lambda **a: codecs.mxfp8_quantize(**a), dict(x=x, scale_mode="floor")),
        ("mxfp8_dequantize", lambda **a: codecs.mxfp8_dequantize(**a), dict(q=mq, scales=ms)),
        ("nvfp4_global_scale", lambda **a: codecs.nvfp4_global_scale(**a), dict(x=x)),
        ("nvfp4_quantize", lambda **a: codecs.nvfp4_quantize(**a), dict(x=x, global_scale=gs)),
        ("nvfp4_dequantize", lambda **a: codecs.nvfp4_dequantize(**a),
         dict(packed=nq, block_scales=ns, global_scale=gs, hidden=128)),
        ("node_limited_topk", lambda **a: routing.node_limited_topk(**a),
         dict(scores=scores, num_topk=2, num_groups=4, max_groups=2)),
        ("Config", lambda **a: moelink.Config(**a),
         dict(num_sms=4, num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=32)),
        ("Config.get_nvl_buffer_size_hint", lambda **a: cfg.get_nvl_buffer_size_hint(**a),
         dict(hidden_bytes=256, num_ranks=2, num_topk=2)),
        ("Config.get_rdma_buffer_size_hint", lambda **a: cfg.get_rdma_buffer_size_hint(**a),
         dict(hidden_bytes=256, num_ranks=4, ranks_per_node=2, num_topk=2)),
    ]


def test_local_entry_points_raise_only_typed_errors():
    rng = random.Random(SEED)
    failures = []
    for label, call, valid in _local_entry_points(rng):
        call(**valid)  # the starting point is valid
        _fuzz(label, rng, call, valid, failures)
    assert not failures, f"{len(failures)} untyped exceptions:\n" + "\n".join(failures[:15])


# ---- Buffer entry points (real rank processes) -------------------------------------------------

def _buffer_case(ctx, seed, cases):
    rng = random.Random(seed)
    failures = []
    cfg = moelink.Config(2, 4, 32)
    hint = cfg.get_nvl_buffer_size_hint(256, ctx.world_size, num_topk=2, num_max_zero_copy_recv_tokens=64)
    buffer = moelink.Buffer(ctx.group, hint)
    other = moelink.Buffer(ctx.group, hint)
    try:
        topk = torch.randint(0, 4, (6, 2))
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 4)
        x = torch.randn(6, 128).to(torch.bfloat16)
        weights = torch.rand(6, 2)
        dispatch_args = dict(x=x, topk_idx=topk, topk_weights=weights, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert, config=cfg)
        recv, _, recv_w, _, handle, _ = buffer.dispatch(**dispatch_args)
        foreign = other.dispatch(**dispatch_args)[4]

        def fresh():  # a Buffer poisoned by a call that reached the kernels is replaced
            nonlocal buffer, handle, recv, recv_w
            if buffer._unusable is not None:
                buffer.destroy()
                buffer = moelink.Buffer(ctx.group, hint)
                recv, _, recv_w, _, handle, _ = buffer.dispatch(**dispatch_args)

        def forged(kind):
            if kind == 0:
                return dataclasses.replace(handle)
            if kind == 1:
                return dataclasses.replace(handle, send_head=handle.send_head + 5)
            if kind == 2:
                return foreign
            if kind == 3:
                return tuple(handle)
            return handle

        def layout(**a):
            fresh()
            return buffer.get_dispatch_layout(**a)

        def dispatch(**a):
            fresh()
            if isinstance(a.get("handle"), int):
                a["handle"] = forged(a["handle"])
            return buffer.dispatch(**a)

        def combine(**a):
            fresh()
            a["handle"] = forged(a["handle"]) if isinstance(a["handle"], int) else a["handle"]
            a.setdefault("x", recv)
            return buffer.combine(**a)

        def autograd_dispatch(**a):
            fresh()
            return moelink.autograd.dispatch(buffer, **a)

        def autograd_combine(**a):
            fresh()
            a["handle"] = forged(a["handle"]) if isinstance(a["handle"], int) else a["handle"]
            return moelink.autograd.combine(buffer, **a)

        def local_tensor(**a):
            fresh()
            return buffer.get_local_buffer_tensor(**a)

        _fuzz("Buffer.get_dispatch_layout", rng, layout, dict(topk_idx=topk, num_experts=4), failures, cases)
        _fuzz("Buffer.dispatch", rng, dispatch, dict(dispatch_args, expert_alignment=1, num_worst_tokens=0), failures,
              cases)
        _fuzz("Buffer.dispatch (cached)", rng, dispatch, dict(x=x, handle=4, config=cfg), failures, cases)
        _fuzz("Buffer.combine", rng, combine, dict(x=recv, handle=4, topk_weights=recv_w, config=cfg), failures, cases)
        _fuzz("Buffer.combine (handles)", rng, combine, dict(handle=rng.randrange(5)), failures, cases // 2)
        for kind in range(4):  # every forged kind is refused, typed
            try:
                combine(handle=kind)
                failures.append(f"forged handle {kind} accepted")
            except errors.MoelinkError:
                pass
        mutated = buffer.dispatch(**dispatch_args)[4]
        mutated.send_head.add_(1)
        try:
            buffer.combine(buffer.dispatch(**dispatch_args)[0], mutated, config=cfg)
            failures.append("mutated handle accepted")
        except errors.InvalidArgument as exc:
            assert "handle.send_head" in str(exc)
        _fuzz("Buffer.get_local_buffer_tensor", rng, local_tensor, dict(dtype=torch.float32, size=torch.Size([4]),
              offset=0), failures, cases)
        _fuzz("autograd.dispatch", rng, autograd_dispatch,
              dict(x=x.float().requires_grad_(), topk_idx=topk, topk_weights=weights, num_experts=4), failures, cases)
        _fuzz("autograd.combine", rng, autograd_combine, dict(x=recv.float().requires_grad_(), handle=4, config=cfg),
              failures, cases)
    finally:
        buffer.destroy()
        other.destroy()
    return failures


def test_buffer_entry_points_raise_only_typed_errors(one_rank):
    failures = one_rank.run(_buffer_case, SEED, CASES)[0]
    assert not failures, f"{len(failures)} untyped exceptions:\n" + "\n".join(failures[:15])


def _internode_case(ctx, seed, cases):
    rng = random.Random(seed)  # the same seed on both ranks: the same arguments, so ranks agree
    failures = []
    cfg = moelink.Config(2, 4, 32, 4, 32)
    nvl = cfg.get_nvl_buffer_size_hint(256, 2, ranks_per_node=1, num_topk=2)
    rdma = cfg.get_rdma_buffer_size_hint(256, 2, ranks_per_node=1, num_topk=2)
    with moelink.Buffer(ctx.group, nvl, rdma, ranks_per_node=1) as buffer:
        topk = torch.randint(0, 4, (6, 2), generator=torch.Generator().manual_seed(seed))
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 4)
        x = torch.ones(6, 128, dtype=torch.bfloat16)
        args = dict(x=x, topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=cfg)
        handle = buffer.dispatch(**args)[4]

        def dispatch(**a):
            if buffer._unusable is not None:
                raise errors.BufferUnusable("poisoned")  # (no fresh Buffer here: keep the case short)
            return buffer.dispatch(**a)

        _fuzz("internode Buffer.dispatch", rng, dispatch, dict(args, num_worst_tokens=0), failures, cases)
        try:
            buffer.combine(torch.zeros(1, 128, dtype=torch.bfloat16), dataclasses.replace(handle), config=cfg)
            failures.append("forged internode handle accepted")
        except errors.MoelinkError:
            pass
    return failures


def test_internode_entry_points_raise_only_typed_errors(two_nodes):
    results = two_nodes.run(_internode_case, SEED, max(8, CASES // 2))
    assert results[0] == [] and results[1] == [], results
