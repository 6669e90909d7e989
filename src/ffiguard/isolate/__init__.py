"""ffiguard isolate mode: a library loaded in a helper process, called like ctypes.

    lib = ffiguard.isolate.IsolatedCDLL("libfoo.so", timeout=2.0)
    lib.foo.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.foo(1, ctypes.byref(out))       # runs in the helper; out is filled

A fault in the library raises the same ForeignFault subclass as trap mode; exit(),
a fatal signal or a hang (timeout) kill only the helper, which is restarted for the
next call.  See docs/isolate.md.
"""
from .errors import (
    ForeignExit, ForeignTimeout, HelperAborted, HelperArithmeticFault, HelperBusError,
    HelperDied, HelperIllegalInstruction, HelperProtocolError, HelperSegmentationFault,
    HelperUnavailable,
    StaleHandle,
)
from .heap import foreign_buffer, foreign_new, in_foreign_heap
from .host import (
    Handle, IsolatedCDLL, IsolatedFunction, configure_spinning, helper_pid, helper_restarts,
    restart_helper, stop_helper,
)

__all__ = [
    "IsolatedCDLL", "IsolatedFunction", "Handle", "foreign_buffer", "foreign_new",
    "in_foreign_heap", "configure_spinning", "restart_helper", "stop_helper", "helper_pid",
    "helper_restarts",
    "ForeignTimeout", "HelperDied", "HelperProtocolError", "ForeignExit", "HelperUnavailable",
    "StaleHandle",
    "HelperSegmentationFault", "HelperBusError", "HelperIllegalInstruction",
    "HelperArithmeticFault", "HelperAborted",
]
