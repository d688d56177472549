"""moelink: expert-parallel communication for Mixture-of-Experts models.

Every kernel runs on two targets: CUDA GPUs (``moelink._cuda``, when built with nvcc) and the CPU,
under moelink's SIMT host runtime (``moelink._host``, always built). CPU tensors use the host
target, CUDA tensors the GPU; ``import moelink`` needs no GPU. Every entry point also takes
``__dlpack__`` arrays (NumPy, CuPy) and returns arrays of the caller's library.

``moelink.autograd`` differentiates dispatch/combine, ``moelink.nn`` has an expert-parallel MoE
layer, and ``moelink.compat.install_deep_ep_alias()`` lets unmodified ``import deep_ep`` code run
on moelink (docs/quickstart.md).
"""

import torch as _torch

from . import autograd, errors, reference, routing, runtime
from ._backend import cuda_available
from .buffer import Buffer, DispatchHandle
from .config import Config
from .errors import CommTimeout, GPUUnavailable, MoelinkError
from .event import EventOverlap
from .layout import DispatchLayout, get_dispatch_layout

__version__ = "0.1.0"

#: dtype of the expert ids moelink's dispatch returns by default (DeepEP's ``topk_idx_t``); int32
#: ids are accepted everywhere too, and come back as int32.
topk_idx_t = _torch.int64

__all__ = [
    "Buffer",
    "CommTimeout",
    "Config",
    "DispatchHandle",
    "EventOverlap",
    "DispatchLayout",
    "GPUUnavailable",
    "MoelinkError",
    "autograd",
    "cuda_available",
    "errors",
    "get_dispatch_layout",
    "reference",
    "runtime",
    "topk_idx_t",
]

from . import compat, nn  # noqa: E402  (after topk_idx_t, which the deep_ep alias exports)
