"""moelink: expert-parallel communication for Mixture-of-Experts models.

Every kernel runs on two targets: CUDA GPUs (``moelink._cuda``, when built with nvcc) and the CPU,
under moelink's SIMT host runtime (``moelink._host``, always built). CPU tensors use the host
target, CUDA tensors the GPU; ``import moelink`` needs no GPU.
"""

from . import errors, reference, routing, runtime
from ._backend import cuda_available
from .buffer import Buffer, DispatchHandle
from .config import Config
from .errors import CommTimeout, GPUUnavailable, MoelinkError
from .event import EventOverlap
from .layout import DispatchLayout, get_dispatch_layout

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "CommTimeout",
    "Config",
    "DispatchHandle",
    "EventOverlap",
    "DispatchLayout",
    "GPUUnavailable",
    "MoelinkError",
    "cuda_available",
    "errors",
    "get_dispatch_layout",
    "reference",
    "runtime",
]
