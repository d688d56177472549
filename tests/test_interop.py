"""DLPack arrays through every public entry point: NumPy in CI (zero-copy both ways, results in
NumPy, bfloat16/float8 as raw bits), CuPy where a GPU exists; negative tests for the conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moelink
from moelink import _interop, codecs, errors, reference
from multiproc import rank_group_fixture

group = rank_group_fixture(2, case_timeout=240)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.uint16).numpy()


# ---- the conversion layer -------------------------------------------------------------------

def test_conversion_is_zero_copy_both_ways(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((6, 8)).astype(np.float32)[:, ::2]  # strided: strides survive
    t = _interop.to_torch("a", a)
    assert t.data_ptr() == a.__array_interface__["data"][0] and t.stride() == (8, 2)
    t[0, 0] = 42.0
    assert a[0, 0] == 42.0  # same memory
    back = _interop.from_torch(t, "numpy")
    assert isinstance(back, np.ndarray) and back.__array_interface__["data"][0] == t.data_ptr()
    # dtypes NumPy lacks leave as raw bits, still zero-copy, and come back as what they stand for
    b = torch.randn(3, 4).to(torch.bfloat16)
    bits = _interop.from_torch(b, "numpy")
    assert bits.dtype == np.uint16 and bits.__array_interface__["data"][0] == b.data_ptr()
    assert torch.equal(_interop.to_torch("b", bits, torch.bfloat16), b)
    f8 = torch.randn(5).to(torch.float8_e4m3fn)
    codes = _interop.from_torch(f8, "numpy")
    assert codes.dtype == np.uint8 and torch.equal(_interop.to_torch("q", codes, torch.float8_e4m3fn).view(torch.uint8),
                                                   f8.view(torch.uint8))
    # raw bits of another size are left alone (validation then names the dtype)
    assert _interop.to_torch("q", np.zeros(3, np.uint16), torch.float8_e4m3fn).dtype == torch.uint16


class _BrokenExporter:
    def __dlpack__(self, *args, **kwargs):
        raise BufferError("cannot export")

    def __dlpack_device__(self):
        return (1, 0)


def test_conversion_errors_are_typed_and_name_the_argument():
    with pytest.raises(errors.InvalidType, match="topk_idx: expected a torch.Tensor or an array exporting __dlpack__"):
        moelink.get_dispatch_layout(_BrokenExporter(), 4, 2)
    with pytest.raises(errors.InvalidType, match=r"x: expected a torch.Tensor"):
        codecs.fp8_quantize(_BrokenExporter())
    # Not an array at all: the entry point's own validation answers.
    with pytest.raises(errors.InvalidType, match="topk_idx: expected a torch.Tensor, got list"):
        moelink.get_dispatch_layout([[0, 1]], 4, 2)


def test_torch_calls_take_the_fast_path_and_return_torch():
    idx = torch.tensor([[0, 1], [2, -1]])
    layout = moelink.get_dispatch_layout(idx, 4, 2)
    assert isinstance(layout.is_token_in_rank, torch.Tensor)
    assert getattr(moelink.get_dispatch_layout, "__moelink_accepts_arrays__", False)
    for fn in (codecs.fp8_quantize, codecs.fp8_dequantize, codecs.logfmt_encode, codecs.logfmt_decode,
               moelink.Buffer.dispatch, moelink.Buffer.combine, moelink.Buffer.get_dispatch_layout,
               moelink.autograd.dispatch, moelink.autograd.combine):
        assert getattr(fn, "__moelink_accepts_arrays__", False), fn


# ---- layout and codecs with NumPy -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_layout_with_numpy(seed, dtype):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, 16, size=(37, 4)).astype(dtype)
    layout = moelink.get_dispatch_layout(idx, 16, 4, 2)
    assert type(layout) is moelink.DispatchLayout
    want = reference.dispatch_layout(torch.from_numpy(idx.astype(np.int64)), 16, 4, 2)
    for got, expected in zip(layout, want):
        assert isinstance(got, np.ndarray)
        assert np.array_equal(got, expected.numpy())
    with pytest.raises(errors.InvalidArgument, match="topk_idx: expected expert ids"):
        moelink.get_dispatch_layout(idx + 16, 16, 4)
    with pytest.raises(errors.InvalidShape, match="topk_idx: expected a contiguous tensor"):
        moelink.get_dispatch_layout(np.asfortranarray(rng.integers(0, 16, size=(5, 3))), 16, 4)


def test_codecs_with_numpy(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((9, 300)) * 3).astype(np.float32)
    for scale_format in ("float32", "ue8m0"):
        q, scales = codecs.fp8_quantize(x, scale_format=scale_format)
        tq, tscales = codecs.fp8_quantize(torch.from_numpy(x), scale_format=scale_format)
        assert q.dtype == np.uint8 and np.array_equal(q, tq.view(torch.uint8).numpy())
        assert isinstance(scales, np.ndarray) and np.array_equal(scales, tscales.numpy())
        out = codecs.fp8_dequantize(q, scales, torch.float32)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert np.array_equal(out, codecs.fp8_dequantize(tq, tscales, torch.float32).numpy())
        bf = codecs.fp8_dequantize(q, scales)  # bf16 out: raw bits
        assert bf.dtype == np.uint16 and np.array_equal(bf, _bf16_bits(codecs.fp8_dequantize(tq, tscales)))
    # bf16 input as raw bits
    xb = torch.from_numpy(x).to(torch.bfloat16)
    q_bits, _ = codecs.fp8_quantize(_bf16_bits(xb))
    assert np.array_equal(q_bits, codecs.fp8_quantize(xb)[0].view(torch.uint8).numpy())
    for bits in (8, 10):
        packed = codecs.logfmt_encode(x, bits)
        assert packed.dtype == np.uint8 and np.array_equal(packed, codecs.logfmt_encode(torch.from_numpy(x), bits).numpy())
        decoded = codecs.logfmt_decode(packed, 300, bits, torch.float32)
        assert np.array_equal(decoded, codecs.logfmt_decode(torch.from_numpy(packed), 300, bits, torch.float32).numpy())
    # Validation is the tensor path's: a row stride that is not unit is refused, naming x.
    with pytest.raises(errors.InvalidShape, match="x: expected unit stride along the last dimension"):
        codecs.fp8_quantize(x[:, ::2])
    with pytest.raises(errors.InvalidDType, match="x: expected dtype"):
        codecs.fp8_quantize(x.astype(np.float64))


# ---- Buffer dispatch / combine with NumPy, on 2 ranks ---------------------------------------

def _numpy_dispatch_combine(ctx, seed):
    world, rank = ctx.world_size, ctx.rank
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(int(torch.randint(1, 40, (1,), generator=gen)), 64, generator=gen) for _ in range(world)]
    idx = [torch.randint(-1, 4 * world, (x.shape[0], 3), generator=gen) for x in xs]
    ws = [torch.rand(x.shape[0], 3, generator=gen) for x in xs]
    size = moelink.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(64 * 4, world)
    with moelink.Buffer(ctx.group, size) as buffer:
        x_np, idx_np, w_np = xs[rank].numpy(), idx[rank].numpy().astype(np.int32), ws[rank].numpy()
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx_np, 4 * world)
        assert isinstance(in_rank, np.ndarray) and in_rank.dtype == np.bool_ and per_node is None
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x_np, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx_np, topk_weights=w_np)
        want = reference.intranode_dispatch(xs, idx, 4 * world, ws)[rank]
        assert isinstance(recv_x, np.ndarray) and np.array_equal(recv_x, want.recv_x.numpy())
        assert recv_idx.dtype == np.int32 and np.array_equal(recv_idx, want.recv_topk_idx.numpy())
        assert np.array_equal(recv_w, want.recv_topk_weights.numpy())
        assert counts == want.num_recv_tokens_per_expert_list and isinstance(handle, moelink.DispatchHandle)
        # combine: NumPy has no bfloat16, so its rows travel as raw bits (uint16) both ways
        rows = torch.from_numpy(recv_x).to(torch.bfloat16)
        combined, combined_w, _ = buffer.combine(_bf16_bits(rows), handle, topk_weights=recv_w)
        assert combined.dtype == np.uint16 and isinstance(combined_w, np.ndarray)
        expected, expected_w, _ = buffer.combine(rows, handle, topk_weights=torch.from_numpy(recv_w))
        assert np.array_equal(combined, expected.view(torch.uint16).numpy())
        assert np.array_equal(combined_w, expected_w.numpy())
        # a cached dispatch from NumPy too
        again = buffer.dispatch(x_np, handle=handle)[0]
        assert np.array_equal(again, recv_x)
        with pytest.raises(errors.InvalidDType, match="x: expected dtype torch.bfloat16"):
            buffer.combine(recv_x, handle)  # float32 rows: the wire format is bf16
    return True


def test_buffer_dispatch_and_combine_with_numpy(group, seed):
    assert group.run(_numpy_dispatch_combine, seed) == [True] * group.world_size


# ---- CuPy (GPU only) ------------------------------------------------------------------------

def test_cupy_arrays_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    if not moelink.cuda_available():
        pytest.skip("no usable GPU for moelink's CUDA extension")
    x = cupy.random.standard_normal((8, 256), dtype=cupy.float32)
    q, scales = codecs.fp8_quantize(x)
    assert type(q).__module__.startswith("cupy") and type(scales).__module__.startswith("cupy")
    tq, tscales = codecs.fp8_quantize(torch.from_dlpack(x))
    assert bool(cupy.all(q == cupy.from_dlpack(tq.view(torch.uint8))))
    layout = moelink.get_dispatch_layout(cupy.zeros((4, 2), dtype=cupy.int64), 4, 2)
    assert type(layout.is_token_in_rank).__module__.startswith("cupy")
