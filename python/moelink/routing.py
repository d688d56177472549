"""Node-limited (group-limited) top-k routing, as DeepSeek-V3's gate does it.

DeepSeek-V3 (arXiv:2412.19437, section 2.1.2 and its inference ``Gate``) splits the E routed
experts into G groups of E / G consecutive experts, keeps the ``max_groups`` groups whose two best
experts score highest, and picks the token's top-k experts inside the kept groups only. moelink
places experts contiguously by rank and ranks contiguously by node, so with ``num_groups`` = the
number of nodes a group *is* a node, and every token reaches at most ``max_groups`` nodes: the
network carries each token to at most M nodes (M = 4 of 8 in DeepSeek-V3), which is what the
internode dispatch sends once per destination node.

Pure torch: it runs on whatever device the scores live on (CPU here; CUDA tensors take the same
code path, but no GPU was available to test it).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import InvalidArgument, InvalidDevice, InvalidDType, InvalidShape, InvalidType, argument_error

__all__ = ["node_limited_topk"]

_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise argument_error(InvalidType, name, "an int", type(value).__name__)
    value = int(value)
    if value < minimum:
        raise argument_error(InvalidArgument, name, f"an int >= {minimum}", value)
    return value


def _descending_stable(key: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``key`` along its last dimension from largest to smallest; equal keys
    keep their index order (lower index first)."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def node_limited_topk(scores: torch.Tensor, num_topk: int, num_groups: int, max_groups: int, *,
                      bias: torch.Tensor | None = None, normalize: bool = True,
                      scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's group-limited top-k routing.

    Arguments:
        scores: ``[num_tokens, num_experts]`` router affinities (DeepSeek-V3: sigmoid of the gate
            logits), float32 / bfloat16 / float16 / float64, on the CPU or a CUDA device.
        num_topk: experts per token, ``1 <= num_topk <= max_groups * (num_experts / num_groups)``.
        num_groups: ``G``; ``num_experts`` must be a multiple of it and every group must hold at
            least two experts (a group's score is the sum of its two best). Group ``g`` is experts
            ``[g * E / G, (g + 1) * E / G)``; with experts placed contiguously by rank and ranks
            contiguously by node, use ``G`` = number of nodes for node-limited routing.
        max_groups: ``M``, groups kept per token, ``1 <= M <= G``.
        bias: optional ``[num_experts]`` floating tensor on the scores' device, added to the scores
            for the *choice* only (DeepSeek-V3's auxiliary-loss-free balancing bias).
        normalize: divide the chosen weights by their sum (DeepSeek-V3 does, for sigmoid scores).
        scaling_factor: finite number the weights are multiplied by last (``routed_scaling_factor``).

    Returns ``(topk_idx, topk_weights)``: int64 and float32 ``[num_tokens, num_topk]`` on the scores'
    device. Each row lists its experts from the highest choice score down.

    Rules, in the order applied (all arithmetic in float32):

    1. ``choice = float32(scores) + float32(bias)`` (or ``float32(scores)`` without a bias).
    2. Group score = the sum of the group's two largest ``choice`` values (largest first).
    3. The ``M`` groups with the highest group scores are kept. **Ties** go to the lower group index.
    4. The ``num_topk`` experts of the kept groups with the highest ``choice`` are chosen, experts of
       dropped groups never (even against a kept expert scoring ``-inf``). **Ties** go to the lower
       expert index.
    5. ``weight = float32(scores)`` of each chosen expert (no bias); if ``normalize``, divided by the
       row's sum of those weights; then multiplied by ``scaling_factor``. A row whose chosen
       weights sum to zero gives IEEE results (nan), as DeepSeek-V3's gate would.

    NaN scores are not checked (that would synchronise a CUDA stream); they sort above every number,
    as ``torch.sort`` orders them. Every invalid argument raises a typed ``moelink.errors`` error
    naming it.
    """
    if not isinstance(scores, torch.Tensor):
        raise argument_error(InvalidType, "scores", "a torch.Tensor", type(scores).__name__)
    if scores.dtype not in _SCORE_DTYPES:
        raise argument_error(InvalidDType, "scores", "dtype " + " or ".join(map(str, _SCORE_DTYPES)), scores.dtype)
    if scores.dim() != 2:
        raise argument_error(InvalidShape, "scores", "a 2-D tensor [num_tokens, num_experts]",
                             f"shape {tuple(scores.shape)}")
    if scores.device.type not in ("cpu", "cuda"):
        raise argument_error(InvalidDevice, "scores", "a CPU or CUDA tensor", f"device {scores.device}")
    num_tokens, num_experts = scores.shape
    num_topk = _int("num_topk", num_topk, 1)
    num_groups = _int("num_groups", num_groups, 1)
    max_groups = _int("max_groups", max_groups, 1)
    if num_experts % num_groups != 0:
        raise argument_error(InvalidShape, "scores.shape[1] (num_experts)",
                             f"a multiple of num_groups = {num_groups} (groups of consecutive experts)", num_experts)
    group_size = num_experts // num_groups
    if group_size < 2:
        raise argument_error(InvalidShape, "num_groups",
                             f"at most num_experts / 2 = {num_experts // 2}: a group's score is the sum of its two "
                             f"best experts, so every group needs >= 2 experts",
                             f"{num_groups} (groups of {group_size} expert{'s' if group_size != 1 else ''})")
    if max_groups > num_groups:
        raise argument_error(InvalidArgument, "max_groups", f"an int in [1, num_groups = {num_groups}]", max_groups)
    if num_topk > max_groups * group_size:
        raise argument_error(InvalidArgument, "num_topk",
                             f"<= max_groups * experts per group = {max_groups} * {group_size} = "
                             f"{max_groups * group_size} (experts in the kept groups)", num_topk)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise argument_error(InvalidType, "bias", "a torch.Tensor or None", type(bias).__name__)
        if bias.dtype not in _SCORE_DTYPES:
            raise argument_error(InvalidDType, "bias", "dtype " + " or ".join(map(str, _SCORE_DTYPES)), bias.dtype)
        if tuple(bias.shape) != (num_experts,):
            raise argument_error(InvalidShape, "bias", f"shape ({num_experts},) (one value per expert)",
                                 f"shape {tuple(bias.shape)}")
        if bias.device != scores.device:
            raise argument_error(InvalidDevice, "bias", f"a tensor on scores' device {scores.device}",
                                 f"device {bias.device}")
    if not isinstance(normalize, bool):
        raise argument_error(InvalidType, "normalize", "a bool", type(normalize).__name__)
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real):
        raise argument_error(InvalidType, "scaling_factor", "a real number", type(scaling_factor).__name__)
    if not math.isfinite(float(scaling_factor)):
        raise argument_error(InvalidArgument, "scaling_factor", "a finite number", scaling_factor)

    device = scores.device
    original = scores.detach().to(torch.float32)
    choice = original + bias.detach().to(torch.float32) if bias is not None else original

    # 2-3: group scores, kept groups.
    grouped = choice.view(num_tokens, num_groups, group_size)
    top2 = torch.gather(grouped, 2, _descending_stable(grouped)[..., :2])
    group_scores = top2[..., 0] + top2[..., 1]
    kept_groups = _descending_stable(group_scores)[:, :max_groups]
    kept = torch.zeros(num_tokens, num_groups, dtype=torch.int8, device=device)
    kept.scatter_(1, kept_groups, 1)
    kept_expert = kept.repeat_interleave(group_size, dim=1)

    # 4: lexicographic (kept, choice, -index) order: stable sort by choice, then stably by kept.
    by_choice = _descending_stable(choice)
    by_kept = _descending_stable(torch.gather(kept_expert, 1, by_choice))
    topk_idx = torch.gather(by_choice, 1, by_kept)[:, :num_topk].contiguous()

    # 5: weights from the unbiased scores.
    weights = torch.gather(original, 1, topk_idx)
    if normalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    if float(scaling_factor) != 1.0:
        weights = weights * float(scaling_factor)
    return topk_idx.to(torch.int64), weights.to(torch.float32).contiguous()
