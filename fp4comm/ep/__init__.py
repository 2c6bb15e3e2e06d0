"""Expert-parallel dispatch and combine (DESIGN.md section 4).

``EPBuffer`` is the entry point; ``get_dispatch_layout`` the public routing layout;
backends implement :class:`~fp4comm.ep.backend.EPBackend` and register in
``fp4comm.ep.buffer.BACKENDS``.
"""

from .backend import EPBackend, TransferPlan
from .buffer import BACKENDS, DispatchOutput, EPBuffer, EPConfig, EPHandle, available_backends, get_backend_class
from .layout import DispatchLayout, get_dispatch_layout
from .message import MessageLayout

__all__ = [
    "BACKENDS",
    "DispatchLayout",
    "DispatchOutput",
    "EPBackend",
    "EPBuffer",
    "EPConfig",
    "EPHandle",
    "MessageLayout",
    "TransferPlan",
    "available_backends",
    "get_backend_class",
    "get_dispatch_layout",
]
