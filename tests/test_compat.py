"""``moelink.compat.install_deep_ep_alias()``: unmodified framework call sequences on moelink.

The three sequences below are written from the documented use of DeepEP in Megatron-LM
(``megatron/core/transformer/moe/fused_a2a.py``: ``get_buffer``, ``FusedDispatch`` /
``FusedCombine`` forward and backward), SGLang (``token_dispatcher/deepep.py``, the normal-mode
dispatcher: buffer sizing, JSON ``Config``, FP8 per-token-group quantisation with column-major
UE8M0 scales, ``expert_alignment=128``) and vLLM (``deepep_ht_prepare_finalize.py``: keyword
calls, ``event.event is not None`` checks, local-to-global expert ids, weight-and-reduce before
combine, ``output.copy_``). They only ever touch ``deep_ep`` names; results are checked against a
single-process computation."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import moelink
from moelink import codecs, compat, errors
from multiproc import rank_group_fixture
from test_autograd import _close, _problem, _reference, _term_bounds

group = rank_group_fixture(2, 4, case_timeout=240)


# ---- the alias itself (in the test process) ------------------------------------------------

@pytest.fixture
def clean_modules():
    saved = {name: sys.modules.pop(name) for name in compat.MODULE_NAMES if name in sys.modules}
    yield
    compat.uninstall_deep_ep_alias()
    for name in compat.MODULE_NAMES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_alias_registers_the_names_frameworks_import(clean_modules):
    module = compat.install_deep_ep_alias()
    import deep_ep
    from deep_ep import Buffer, Config, EventOverlap, topk_idx_t
    from deep_ep.utils import EventHandle, EventOverlap as UtilsEventOverlap

    assert deep_ep is module and Buffer is moelink.Buffer and Config is moelink.Config
    assert EventOverlap is moelink.EventOverlap is UtilsEventOverlap and topk_idx_t == torch.int64
    assert compat.install_deep_ep_alias() is module  # idempotent
    EventOverlap(EventHandle()).current_stream_wait()  # Megatron's previous_event: no CUDA needed
    with EventOverlap(EventHandle()):
        pass
    assert Config(**{"num_sms": 4, "num_max_nvl_chunked_send_tokens": 6, "num_max_nvl_chunked_recv_tokens": 64,
                     "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 64}).num_sms == 4
    assert compat.uninstall_deep_ep_alias() is module and "deep_ep" not in sys.modules


def test_alias_refuses_a_real_deep_ep(clean_modules):
    real = types.ModuleType("deep_ep")
    real.__file__ = "/opt/deep_ep/__init__.py"
    sys.modules["deep_ep"] = real
    with pytest.raises(errors.AliasConflict, match=r"deep_ep: expected no real deep_ep imported .* /opt/deep_ep"):
        compat.install_deep_ep_alias()
    assert sys.modules["deep_ep"] is real  # untouched
    assert compat.uninstall_deep_ep_alias() is None and sys.modules["deep_ep"] is real
    sys.modules.pop("deep_ep")
    sys.modules["deep_ep.utils"] = types.ModuleType("deep_ep.utils")
    with pytest.raises(errors.AliasConflict, match="deep_ep.utils"):
        compat.install_deep_ep_alias()


# ---- Megatron-LM: fused_a2a ----------------------------------------------------------------

def _megatron_module():
    """Megatron's fused_a2a call sequence, on whatever ``deep_ep`` is importable."""
    from deep_ep import Buffer
    from deep_ep.utils import EventHandle, EventOverlap

    state = {"buffer": None}

    def get_hidden_bytes(x):
        return x.size(1) * max(x.element_size(), 2)

    def get_buffer(group, hidden_bytes):
        num_nvl_bytes = num_rdma_bytes = 0
        for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
        buffer = state["buffer"]
        if (buffer is None or buffer.group != group or buffer.num_nvl_bytes < num_nvl_bytes
                or buffer.num_rdma_bytes < num_rdma_bytes):
            state["buffer"] = Buffer(group, num_nvl_bytes, num_rdma_bytes)
        return state["buffer"]

    class FusedDispatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                    allocate_on_comm_stream=False):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(group, get_hidden_bytes(x))
            per_rank, per_rdma_rank, per_expert, in_rank, event = buffer.get_dispatch_layout(
                token_indices, num_experts, previous_event=previous_event, async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            recv_x, recv_indices, recv_probs, per_expert_list, handle, after = buffer.dispatch(
                x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                previous_event=event, async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after.current_stream_wait()
            ctx.group, ctx.handle, ctx.async_finish = group, handle, async_finish
            ctx.allocate_on_comm_stream = allocate_on_comm_stream
            return recv_x, recv_indices, recv_probs, torch.tensor(per_expert_list), handle

        @staticmethod
        def backward(ctx, grad_output, grad_indices, grad_probs, grad_tokens_per_expert, grad_handle):
            buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
            previous_event = EventOverlap(EventHandle()) if ctx.async_finish else None
            grad_x, grad_probs, after = buffer.combine(
                grad_output.contiguous(), ctx.handle, topk_weights=grad_probs.float(), previous_event=previous_event,
                async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate_on_comm_stream)
            if ctx.async_finish:
                after.current_stream_wait()
            return grad_x, None, grad_probs, None, None, None, None

    class FusedCombine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(group, get_hidden_bytes(x))
            combined_x, _, after = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                  previous_event=previous_event,
                                                  allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after.current_stream_wait()
            ctx.handle, ctx.group, ctx.async_finish = handle, group, async_finish
            ctx.allocate_on_comm_stream = allocate_on_comm_stream
            return combined_x, None

        @staticmethod
        def backward(ctx, grad_output, previous_event=None):
            previous_event = EventOverlap(EventHandle()) if ctx.async_finish else None
            buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
            grad_x, _, _, _, _, after = buffer.dispatch(grad_output.contiguous(), handle=ctx.handle,
                                                        previous_event=previous_event, async_finish=ctx.async_finish,
                                                        allocate_on_comm_stream=ctx.allocate_on_comm_stream)
            if ctx.async_finish:
                after.current_stream_wait()
            return grad_x, None, None, None, None

    return types.SimpleNamespace(FusedDispatch=FusedDispatch, FusedCombine=FusedCombine, state=state,
                                 set_deepep_num_sms=Buffer.set_num_sms)


def _megatron(ctx, seed, async_finish):
    compat.install_deep_ep_alias()
    world, rank = ctx.world_size, ctx.rank
    mega = _megatron_module()
    mega.set_deepep_num_sms(4)
    try:
        epr = 2
        xs, idx, weights, experts, out_grads = _problem(seed, world, dict(hidden=64, num_topk=4, experts_per_rank=epr))
        bf16_xs = [x.to(torch.bfloat16).double() for x in xs]
        ref_x, ref_w, ref_W = _reference(bf16_xs, idx, weights, experts, out_grads, slot_term=False)
        abs_x, abs_w, abs_W = _term_bounds(bf16_xs, idx, weights, experts, out_grads, slot_term=False)
        x = xs[rank].to(torch.bfloat16).requires_grad_()
        probs = weights[rank].clone().requires_grad_()
        local = experts[rank * epr:(rank + 1) * epr].clone().requires_grad_()
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = mega.FusedDispatch.apply(
            x.contiguous(), idx[rank], probs, epr * world, ctx.group, async_finish)
        assert int(tokens_per_expert.sum()) == int((recv_idx >= 0).sum())
        assert int(handle[0][-1][rank]) == recv_x.shape[0]  # the received count, read DeepEP's way
        hidden = torch.zeros(recv_x.shape, dtype=torch.float32)
        for e in range(epr):
            gate = ((recv_idx == e) * recv_probs).sum(1, keepdim=True)
            hidden = hidden + gate * (recv_x.float() @ local[e])
        y, _ = mega.FusedCombine.apply(hidden.to(torch.bfloat16), ctx.group, handle, async_finish)
        (y.float() * out_grads[rank]).sum().backward()
        _close("x.grad", x.grad, ref_x[rank], rank, abs_x[rank])
        _close("token_probs.grad", probs.grad, ref_w[rank], rank, abs_w[rank])
        here = slice(rank * epr, (rank + 1) * epr)
        _close("expert grad", local.grad, ref_W[here], rank, abs_W[here])
        buffer = mega.state["buffer"]
        assert buffer.num_nvl_bytes > 0 and buffer.num_rdma_bytes == 0
    finally:
        moelink.Buffer.set_num_sms(moelink.config.DEFAULT_NUM_SMS)
        if mega.state["buffer"] is not None:
            mega.state["buffer"].destroy()
    return True


@pytest.mark.parametrize("async_finish", [False, True])
def test_megatron_fused_a2a_forward_and_backward(group, seed, async_finish):
    assert group.run(_megatron, seed, async_finish) == [True] * group.world_size


# ---- SGLang: normal-mode DeepEP dispatcher -------------------------------------------------

def _column_major_tma_aligned(scales: torch.Tensor) -> torch.Tensor:
    """The scale layout DeepGEMM wants (SGLang's column_major_scales + scale_tma_aligned): each
    column contiguous, the token dimension padded to 16 bytes."""
    tokens, cols = scales.shape
    aligned = -(-max(tokens, 1) // 4) * 4
    storage = torch.zeros(cols, aligned, dtype=scales.dtype)
    view = storage.t()[:tokens]
    view.copy_(scales)
    return view


def _sglang(ctx, seed, use_fp8, ue8m0, async_finish):
    compat.install_deep_ep_alias()
    from deep_ep import Buffer, Config

    world, rank = ctx.world_size, ctx.rank
    hidden, num_topk, num_experts = 256, 4, 4 * world
    # DeepEPConfig: a JSON config string, as --deepep-config takes it
    cfg = json.loads(json.dumps({
        "normal_dispatch": dict(num_sms=4, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=64,
                                num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=64),
        "normal_combine": dict(num_sms=4, num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=64,
                               num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=64)}))
    dispatch_config, combine_config = Config(**cfg["normal_dispatch"]), Config(**cfg["normal_combine"])
    num_sms = cfg["normal_dispatch"]["num_sms"]
    # DeepEPBuffer.get_deepep_buffer (normal mode)
    param_bytes = 2  # bf16 dispatcher output; rows of combine are bf16 in every mode
    hidden_bytes = hidden * param_bytes
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (dispatch_config or Buffer.get_dispatch_config(world), combine_config or Buffer.get_combine_config(world)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, world), num_rdma_bytes)
    buffer = Buffer(ctx.group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank=num_sms,
                    allow_mnnvl=True)
    try:
        gen = torch.Generator().manual_seed(seed)
        n = [int(torch.randint(0, 40, (1,), generator=gen)) for _ in range(world)][rank]
        gen = torch.Generator().manual_seed(seed + 1 + rank)
        hidden_states = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        topk_ids = torch.randint(-1, num_experts, (n, num_topk), generator=gen).to(torch.int32)
        topk_weights = torch.rand(n, num_topk, generator=gen)
        # dispatch_a
        topk_ids = topk_ids.to(torch.int64)
        x = hidden_states
        if use_fp8:  # sglang_per_token_group_quant_fp8(x, 128, column_major_scales=ue8m0, ...)
            q, scales = codecs.fp8_quantize(hidden_states, scale_format="ue8m0" if ue8m0 else "float32")
            x = (q, _column_major_tma_aligned(scales) if ue8m0 else scales)
        previous_event = Buffer.capture() if async_finish else None
        # dispatch_b / _dispatch_core
        per_rank, per_rdma_rank, per_expert, in_rank, previous_event = buffer.get_dispatch_layout(
            topk_ids, num_experts, previous_event=previous_event, async_finish=async_finish,
            allocate_on_comm_stream=previous_event is not None)
        recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = buffer.dispatch(
            x, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            previous_event=previous_event, async_finish=async_finish,
            allocate_on_comm_stream=(previous_event is not None) and async_finish, expert_alignment=128,
            config=dispatch_config)
        event.current_stream_wait() if async_finish else ()
        if isinstance(recv_x, tuple):
            recv_x, recv_scale = recv_x
        else:
            recv_scale = None
        assert all(c % 128 == 0 for c in num_recv_tokens_per_expert)
        assert sum(-(-int((recv_topk_ids == e).sum()) // 128) * 128 for e in range(4)) == sum(num_recv_tokens_per_expert)
        # The experts (DeepGEMM in SGLang): dequantize, f(x) = 2x + 1 per expert e scaled by (e+1).
        if use_fp8:
            assert recv_scale.is_contiguous() and recv_scale.dtype == x[1].dtype
            rows = codecs.fp8_dequantize(recv_x, recv_scale, torch.float32)
        else:
            rows = recv_x.float()
        out = torch.zeros_like(rows)
        for e in range(4):
            gate = ((recv_topk_ids == e) * recv_topk_weights).sum(1, keepdim=True)
            out += gate * (rows * 2 + 1) * (e + 1)
        # combine_a / combine_b
        previous_event = Buffer.capture() if async_finish else None
        combined_x, _, event = buffer.combine(out.to(torch.bfloat16), handle, async_finish=async_finish,
                                              previous_event=previous_event,
                                              allocate_on_comm_stream=previous_event is not None, config=combine_config)
        event.current_stream_wait() if async_finish else ()
        # On this rank, token t should get sum over valid k of w[t, k] * f_{e_k}(x_t).
        own = codecs.fp8_dequantize(q, scales, torch.float32) if use_fp8 else hidden_states.float()
        scale = ((topk_ids >= 0) * topk_weights * (topk_ids % 4 + 1)).sum(1, keepdim=True)
        want = scale * (own * 2 + 1)
        assert combined_x.dtype == torch.bfloat16
        _close("combined_x", combined_x.float(), want.double(), rank)
    finally:
        buffer.destroy()
    return True


@pytest.mark.parametrize("use_fp8,ue8m0,async_finish", [(False, False, False), (True, False, True), (True, True, False)],
                         ids=["bf16", "fp8-float32-scales", "fp8-ue8m0-column-major"])
def test_sglang_normal_dispatcher(group, seed, use_fp8, ue8m0, async_finish):
    assert group.run(_sglang, seed, use_fp8, ue8m0, async_finish) == [True] * group.world_size


# ---- vLLM: DeepEPHTPrepareAndFinalize ------------------------------------------------------

def _vllm(ctx, seed, quant):
    compat.install_deep_ep_alias()
    import deep_ep

    world, rank = ctx.world_size, ctx.rank
    hidden, topk, num_experts = 128, 2, 2 * world
    hint = max(deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden * 2, world),
               deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden * 2, world))
    # vLLM's all2all manager (it asks for 1 GiB; the hint is enough here)
    buffer = deep_ep.Buffer(group=ctx.group, num_nvl_bytes=hint, num_rdma_bytes=0, low_latency_mode=False,
                            num_qps_per_rank=1)
    try:
        available_rank_configs = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]
        dispatch_config = deep_ep.Buffer.get_dispatch_config(world) if world in available_rank_configs else None
        combine_config = deep_ep.Buffer.get_combine_config(world) if world in available_rank_configs else None
        rank_expert_offset = rank * (num_experts // world)
        gen = torch.Generator().manual_seed(seed + rank)
        n = int(torch.randint(0, 30, (1,), generator=gen))
        a1 = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        topk_ids = torch.randint(0, num_experts, (n, topk), generator=gen)
        topk_weights = torch.rand(n, topk, generator=gen)
        # prepare_async: quantise first when the scheme is block/per-token quantised
        if quant == "per-token":  # [N, 1] float32 scales
            scale = a1.float().abs().amax(1, keepdim=True).clamp(min=1e-6) / 448.0
            token_data = ((a1.float() / scale).to(torch.float8_e4m3fn), scale)
        elif quant == "block":  # [N, hidden / 128]
            token_data = codecs.fp8_quantize(a1)
        else:
            token_data = a1
        previous_event = buffer.capture()  # dbo_get_previous_event(self.buffer.capture) with DBO on
        per_rank, per_rdma_rank, dispatch_expert_num_tokens, in_rank, event = buffer.get_dispatch_layout(
            topk_idx=topk_ids, num_experts=num_experts, previous_event=previous_event, async_finish=False,
            allocate_on_comm_stream=False)
        token_data, expert_topk_ids, expert_topk_weights, per_expert_list, handle, event = buffer.dispatch(
            x=token_data, handle=None, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=topk_ids,
            topk_weights=topk_weights, expert_alignment=1, config=dispatch_config, previous_event=previous_event,
            async_finish=True, allocate_on_comm_stream=False)
        # _receiver
        if event.event is not None:
            event.current_stream_wait()
        if quant != "none":
            expert_x, expert_x_scale = token_data
            assert expert_x_scale.shape[1] == token_data[1].shape[1] and expert_x_scale.dtype == torch.float32
            expert_x = codecs.fp8_dequantize(expert_x, expert_x_scale, torch.float32) if quant == "block" else \
                expert_x.float() * expert_x_scale
        else:
            expert_x = token_data.float()
        received_local = (expert_topk_ids >= 0).sum()
        expert_topk_ids = torch.where(expert_topk_ids == -1, num_experts - 1 if rank_expert_offset == 0 else 0,
                                      expert_topk_ids + rank_expert_offset)
        expert_num_tokens = torch.tensor(per_expert_list, dtype=torch.int32)  # ExpertTokensMetadata.make_from_list
        assert int(expert_num_tokens.sum()) == int(received_local)
        # experts on [M, topk, hidden] (Standard activation format); non-local slots map to nothing
        local = (expert_topk_ids >= rank_expert_offset) & (expert_topk_ids < rank_expert_offset + num_experts // world)
        fused_expert_output = (expert_x[:, None, :] * (expert_topk_ids[..., None] + 1)) * local[..., None]
        # _finalize: TopKWeightAndReduceContiguous, then combine
        if fused_expert_output.numel() != 0:
            fused_expert_output = (fused_expert_output * expert_topk_weights[..., None]).sum(1).to(torch.bfloat16)
        else:
            fused_expert_output = torch.empty(0, hidden, dtype=torch.bfloat16)
        assert fused_expert_output.dtype == torch.bfloat16
        previous_event = buffer.capture()
        combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                              config=combine_config, previous_event=previous_event, async_finish=True,
                                              allocate_on_comm_stream=False)
        output = torch.empty(n, hidden, dtype=torch.bfloat16)
        if event.event is not None:
            event.current_stream_wait()
        output.copy_(combined_x, non_blocking=True)
        # reference: sum_k w[t, k] * (global expert id + 1) * x_t (dequantised as it travelled)
        if quant == "per-token":
            own = (a1.float() / scale).to(torch.float8_e4m3fn).float() * scale
        elif quant == "block":
            q, s = codecs.fp8_quantize(a1)
            own = codecs.fp8_dequantize(q, s, torch.float32)
        else:
            own = a1.float()
        want = (topk_weights * (topk_ids + 1)).sum(1, keepdim=True) * own
        _close("output", output.float(), want.double(), rank)
    finally:
        buffer.destroy()
    return True


@pytest.mark.parametrize("quant", ["none", "per-token", "block"])
def test_vllm_high_throughput_prepare_finalize(group, seed, quant):
    assert group.run(_vllm, seed, quant) == [True] * group.world_size


# ---- num_worst_tokens, DeepEP style ---------------------------------------------------------

def _worst_tokens_deepep_way(ctx, seed):
    """Padded dispatch (CUDA-graph style): the received count comes from handle[0][-1][rank], the
    padded expert output goes straight back into combine."""
    compat.install_deep_ep_alias()
    import deep_ep

    world, rank = ctx.world_size, ctx.rank
    size = deep_ep.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(64 * 2, world)
    with deep_ep.Buffer(ctx.group, size) as buffer:
        gen = torch.Generator().manual_seed(seed + rank)
        n = 24
        x = torch.randn(n, 64, generator=gen).to(torch.bfloat16)
        topk_idx = torch.randint(-1, 2 * world, (n, 3), generator=gen)
        w = torch.rand(n, 3, generator=gen)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 2 * world)
        worst = n * world
        recv_x, recv_idx, recv_w, empty, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=w, num_worst_tokens=worst)
        assert recv_x.shape[0] == worst and empty == [] and len(handle) == 6
        actual = int(handle[0][-1][rank])
        rank_prefix, channel_prefix, recv_channel_prefix, src_idx, is_token_in_rank, send_head = handle
        assert actual == handle.num_recv_tokens and src_idx.shape[0] == actual
        assert torch.equal(is_token_in_rank, in_rank)
        assert torch.equal(channel_prefix[:, -1], in_rank.sum(0).to(torch.int32))  # inclusive prefix: totals
        assert int(recv_channel_prefix[0, 0]) == 0 and bool((recv_idx[actual:] == -1).all())
        out = recv_x.float() * 3  # padded rows hold garbage-free zeros, and are ignored anyway
        out[actual:] = 1e4
        combined, combined_w, _ = buffer.combine(out.to(torch.bfloat16), handle, topk_weights=recv_w)
        copies = in_rank.sum(1, keepdim=True).float()
        assert torch.allclose(combined.float(), (x.float() * 3 * copies).to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)
        assert torch.allclose(combined_w, w * (topk_idx >= 0))
        # a cached dispatch with the padded handle returns the padded rows, as DeepEP's
        again = buffer.dispatch(x, handle=handle)[0]
        assert again.shape[0] == worst and torch.equal(again[:actual], recv_x[:actual])
    return True


def test_num_worst_tokens_the_deep_ep_way(group, seed):
    assert group.run(_worst_tokens_deepep_way, seed) == [True] * group.world_size
