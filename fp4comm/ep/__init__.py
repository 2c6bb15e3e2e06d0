"""Expert-parallel dispatch and combine (DESIGN.md section 4).

``EPBuffer`` is the entry point (high throughput); ``LowLatencyBuffer`` the decode path
(no host sync, fixed buffers, CUDA-graph capturable); ``get_dispatch_layout`` the public routing layout;
backends implement :class:`~fp4comm.ep.backend.EPBackend` and register in
``fp4comm.ep.buffer.BACKENDS``.
"""

from .backend import EPBackend, TransferPlan
from .buffer import BACKENDS, DispatchOutput, EPBuffer, EPConfig, EPHandle, available_backends, get_backend_class
from .layout import DispatchLayout, get_dispatch_layout
from .low_latency import LowLatencyBuffer, LowLatencyConfig, LowLatencyDispatchOutput, LowLatencyHandle
from .message import COMBINE_PAYLOADS, CombineLayout, MessageLayout

__all__ = [
    "BACKENDS",
    "COMBINE_PAYLOADS",
    "CombineLayout",
    "DispatchLayout",
    "DispatchOutput",
    "EPBackend",
    "EPBuffer",
    "EPConfig",
    "EPHandle",
    "LowLatencyBuffer",
    "LowLatencyConfig",
    "LowLatencyDispatchOutput",
    "LowLatencyHandle",
    "MessageLayout",
    "TransferPlan",
    "available_backends",
    "get_backend_class",
    "get_dispatch_layout",
]
