"""What every moelink operation returns, stated in plain torch (float64 where precision matters)
with no performance tricks. Kernels are tested against these functions."""

from . import codecs
from .dispatch import (CombineResult, DispatchResult, assert_combine_close, combine_tolerance, intranode_combine,
                       intranode_dispatch)
from .layout import dispatch_layout

__all__ = [
    "CombineResult",
    "DispatchResult",
    "assert_combine_close",
    "codecs",
    "combine_tolerance",
    "dispatch_layout",
    "intranode_combine",
    "intranode_dispatch",
]
