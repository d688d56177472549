"""moelink.config: validation of every Config field, default configs for any rank count, the NVL
buffer layout (disjoint, aligned arrays) and size hint, and agreement with the C++ mirror
csrc/runtime/config.h (compiled here with g++)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest

from moelink import config as cfg
from moelink import errors
from moelink.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
          "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"]


def test_defaults_match_deepep_and_are_frozen():
    c = Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 256)
    assert Config(24, 8, 128, 4, 64).num_channels == 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_sms = 4


@pytest.mark.parametrize("value", [0, 1, 3, -2, 21])
def test_num_sms_even_and_at_least_two(value):
    with pytest.raises(errors.InvalidArgument, match=f"Config.num_sms: expected an even int >= 2, got {value}"):
        Config(num_sms=value)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", [2.0, "8", True, None])
def test_every_field_must_be_an_int(field, value):
    with pytest.raises(errors.InvalidType, match=f"Config.{field}: expected an int, got {type(value).__name__}"):
        Config(**{field: value})


@pytest.mark.parametrize("link", ["nvl", "rdma"])
def test_chunk_sizes(link):
    send, recv = f"num_max_{link}_chunked_send_tokens", f"num_max_{link}_chunked_recv_tokens"
    with pytest.raises(errors.InvalidArgument, match=f"Config.{recv}: expected an int in \\[1, .*got 0"):
        Config(**{recv: 0})
    with pytest.raises(errors.InvalidArgument, match=f"Config.{send}: expected an int in \\[1, .*got 0"):
        Config(**{send: 0})
    with pytest.raises(errors.InvalidArgument, match=f"Config.{send}: expected an int <= {recv} = 8, got 9"):
        Config(**{send: 9, recv: 8})
    with pytest.raises(errors.InvalidArgument, match=f"Config.{recv}: expected an int in"):
        Config(**{recv: 2**31})
    assert getattr(Config(**{send: 8, recv: 8}), send) == 8  # a chunk may fill a whole queue


@pytest.mark.parametrize("num_ranks", list(range(1, 17)) + [24, 48, 72, 100, 144, 160, 256, 1000])
def test_default_configs_for_any_rank_count(num_ranks):
    for make in (cfg.get_dispatch_config, cfg.get_combine_config):
        c = make(num_ranks)
        assert isinstance(c, Config) and c.num_sms == cfg.DEFAULT_NUM_SMS
        assert make(num_ranks, num_sms=4).num_sms == 4
        assert c.get_nvl_buffer_size_hint(7168 * 2, num_ranks) > 0
    assert cfg.get_dispatch_config(2).num_max_nvl_chunked_send_tokens == 24  # DeepEP's tuned 2-rank value
    assert cfg.get_dispatch_config(8).num_max_nvl_chunked_send_tokens == 6
    assert cfg.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10
    assert cfg.get_combine_config(8).num_max_nvl_chunked_send_tokens == 4


def test_default_config_checks_arguments():
    with pytest.raises(errors.InvalidArgument, match="num_ranks"):
        cfg.get_dispatch_config(0)
    with pytest.raises(errors.InvalidArgument, match="num_sms"):
        cfg.get_combine_config(8, num_sms=5)


SHAPES = [  # (ranks, channels, queue slots, row bytes, scales, topk, experts per rank)
    (2, 1, 1, 16, 0, 0, 1), (8, 10, 256, 14336, 0, 8, 32), (8, 12, 256, 7168, 56, 8, 32), (3, 5, 7, 48, 1, 33, 5),
    (1, 1, 2, 16, 1, 1, 1000)]


def test_window_bytes_grow_with_every_field():
    for shape in SHAPES:
        base = cfg.intranode_window_bytes(**dict(zip(_SHAPE_KEYS, shape)))
        for i in range(len(shape)):
            bigger = list(shape)
            bigger[i] += 1
            assert cfg.intranode_window_bytes(**dict(zip(_SHAPE_KEYS, bigger))) >= base


_SHAPE_KEYS = ["num_ranks", "num_channels", "queue_tokens", "row_bytes", "num_scales", "num_topk", "experts_per_rank"]


def test_nvl_hint_formula_and_coverage():
    c = Config(20, 6, 256, 6, 256)
    r, ch, s, hb = 8, 10, 256, 7168 * 2
    hint = c.get_nvl_buffer_size_hint(hb, r)
    assert hint == max(cfg.intranode_window_bytes(num_ranks=r, num_channels=ch, queue_tokens=s, row_bytes=hb,
                                                  num_scales=hb // 128, num_topk=32, experts_per_rank=1024,
                                                  sub_channels=sub) for sub in range(1, 9))
    assert c.get_nvl_buffer_size_hint(hb, 16, ranks_per_node=8) == hint
    # bf16 and FP8 dispatches (top-k <= 32) and combines of this hidden size fit the hint.
    for row, scales, topk in [(hb, 0, 8), (hb // 2, hb // 2 // 128, 32), (hb, 0, 32)]:
        for sub in range(1, 9):  # whatever split the block size picks
            assert cfg.intranode_window_bytes(num_ranks=r, num_channels=ch, queue_tokens=s, row_bytes=row,
                                              num_scales=scales, num_topk=topk, experts_per_rank=256,
                                              sub_channels=sub) <= hint
    assert c.get_nvl_buffer_size_hint(hb, r, num_topk=8) < hint
    assert Config(20, 6, 512).get_nvl_buffer_size_hint(hb, r) > hint
    assert 290 * 2**20 < hint < 300 * 2**20  # the 80 queues' 256 rows of 14 KiB dominate


def test_one_copy_regions_match_the_extension():
    intranode = __import__("moelink._host", fromlist=["_host"]).intranode
    for ranks, channels, slots, row, scales, topk, experts in SHAPES:
        node = intranode.Node(rank=0, num_ranks=ranks, num_channels=channels, block_warps=16, sub_channels=1,
                              queue_tokens=slots, row_bytes=row, num_scales=scales, num_topk=topk,
                              experts_per_rank=experts, windows=[1] * ranks)
        for rows in (0, 1, 7, 5000):
            recv = node.direct_recv_layout(rows, 1 << 40)
            assert recv["bytes"] == cfg.direct_recv_bytes(rows=rows, row_bytes=row, num_scales=scales, num_topk=topk)
            assert recv["base"] == ((1 << 40) - recv["bytes"]) // 128 * 128
            assert node.direct_recv_layout(rows, node.layout["slots"] + recv["bytes"] - 1)["base"] == -1
            combine = node.combine_input_layout(rows)
            assert combine["base"] == node.layout["channel_count"]
            assert combine["base"] + combine["bytes"] == cfg.combine_input_bytes(num_ranks=ranks, rows=rows,
                                                                                  hidden=row // 2, num_topk=topk)
            # the arrays of a region never overlap and stay 16-byte aligned
            offsets = [recv[k] for k in ("row", "scales", "topk", "weights", "src")]
            assert offsets == sorted(offsets) and all(o % 16 == 0 for o in offsets)


def test_python_mirror_matches_the_extension():
    intranode = getattr(__import__("moelink._host", fromlist=["_host"]), "intranode", None)
    if intranode is None:
        pytest.skip("moelink._host has no intranode module yet")
    for ranks, channels, slots, row, scales, topk, experts in SHAPES:
        for sub in (1, 2, 3):
            node = intranode.Node(rank=0, num_ranks=ranks, num_channels=channels, block_warps=16, sub_channels=sub,
                                  queue_tokens=slots, row_bytes=row, num_scales=scales, num_topk=topk,
                                  experts_per_rank=experts, windows=[1] * ranks)
            assert node.window_bytes_needed == cfg.intranode_window_bytes(**dict(zip(_SHAPE_KEYS, (
                ranks, channels, slots, row, scales, topk, experts))), sub_channels=sub)


def test_hint_argument_checks():
    c = Config()
    with pytest.raises(errors.InvalidArgument, match="hidden_bytes"):
        c.get_nvl_buffer_size_hint(0, 8)
    with pytest.raises(errors.InvalidType, match="num_ranks"):
        c.get_nvl_buffer_size_hint(1024, 8.0)
    with pytest.raises(errors.InvalidArgument, match="ranks_per_node"):
        c.get_nvl_buffer_size_hint(1024, 8, ranks_per_node=0)
    assert c.get_rdma_buffer_size_hint(1024, 8) == 0
    two_nodes = c.get_rdma_buffer_size_hint(1024, 16, ranks_per_node=8)
    assert two_nodes > c.get_rdma_buffer_size_hint(512, 16, ranks_per_node=8) > 0
    assert c.get_rdma_buffer_size_hint(1024, 16, ranks_per_node=4) > two_nodes  # more nodes, more queues
    assert c.get_nvl_buffer_size_hint(1024, 16, ranks_per_node=8) >= c.get_nvl_buffer_size_hint(1024, 8)
    with pytest.raises(errors.InvalidArgument, match="ranks_per_node: expected a divisor of num_ranks = 16"):
        c.get_rdma_buffer_size_hint(1024, 16, ranks_per_node=3)


CPP_PROGRAM = r"""
#include <cstdio>
#include "runtime/config.h"
using namespace moelink;
int main() {
  std::printf("%lld %lld %lld %lld %lld\n", (long long)Config(20, 6, 256, 6, 256).nvl_buffer_size_hint(14336, 8),
              (long long)Config(4, 3, 17, 1, 1).nvl_buffer_size_hint(100, 3, 0, 5),
              (long long)Config().nvl_buffer_size_hint(256, 16, 4),
              (long long)Config(20, 6, 256, 6, 256).nvl_buffer_size_hint(14336, 4, 0, 8, 8192),
              (long long)Config(4, 3, 17, 1, 1).nvl_buffer_size_hint(100, 3, 0, 5, 1000000));
  const int bad[][5] = {{3, 6, 256, 6, 256}, {20, 0, 256, 6, 256}, {20, 6, 0, 6, 256}, {20, 9, 8, 6, 256},
                        {20, 6, 256, 7, 6}, {20, 6, 256, 0, 256}, {0, 6, 256, 6, 256}};
  for (auto& b : bad) {
    try { Config(b[0], b[1], b[2], b[3], b[4]); std::printf("accepted\n"); }
    catch (const Error& e) { std::printf("%d %s\n", static_cast<int>(e.kind()), e.what()); }
  }
}
"""
BAD_CONFIGS = [(3, 6, 256, 6, 256), (20, 0, 256, 6, 256), (20, 6, 0, 6, 256), (20, 9, 8, 6, 256), (20, 6, 256, 7, 6),
               (20, 6, 256, 0, 256), (0, 6, 256, 6, 256)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_mirror_agrees(tmp_path):
    source = tmp_path / "config_mirror.cpp"
    source.write_text(CPP_PROGRAM)
    binary = tmp_path / "config_mirror"
    subprocess.run(["g++", "-std=c++20", "-O0", "-I", os.path.join(ROOT, "csrc"), str(source), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert [int(t) for t in lines[0].split()] == [
        Config(20, 6, 256, 6, 256).get_nvl_buffer_size_hint(14336, 8),
        Config(4, 3, 17, 1, 1).get_nvl_buffer_size_hint(100, 3, num_topk=5),
        Config().get_nvl_buffer_size_hint(256, 16, ranks_per_node=4),
        Config(20, 6, 256, 6, 256).get_nvl_buffer_size_hint(14336, 4, num_topk=8, num_max_zero_copy_recv_tokens=8192),
        Config(4, 3, 17, 1, 1).get_nvl_buffer_size_hint(100, 3, num_topk=5, num_max_zero_copy_recv_tokens=1000000)]
    python_messages = []
    for b in BAD_CONFIGS:
        with pytest.raises(errors.InvalidArgument) as info:
            Config(*b)
        python_messages.append(str(info.value))
    cpp = [line.split(" ", 1) for line in lines[1:]]
    assert all(kind == "0" for kind, _ in cpp)  # ErrorKind::kInvalidArgument
    # Same argument named, same expectation; only the int-range wording differs.
    for (_, text), py in zip(cpp, python_messages):
        assert text.split(":")[0] == py.split(":")[0]
