"""ffiguard: foreign calls that cannot crash Python.

A fault inside a guarded foreign call (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, a stack
overflow) raises an ffiguard.ForeignFault subclass that says what happened and where,
and the program goes on.

    import ctypes, ffiguard
    libc = ffiguard.CDLL("libc.so.6")          # drop-in for ctypes.CDLL
    libc.strlen.argtypes = [ctypes.c_char_p]
    try:
        libc.strlen(None)
    except ffiguard.ForeignFault as e:
        print(e)

PYTEST_DONT_REWRITE: this marker keeps pytest from trying to rewrite the package's
asserts; under `python -m ffiguard run -m pytest` it is imported before pytest starts,
and pytest would warn that it cannot.
"""
import ctypes as _ctypes
import importlib.util as _importlib_util
import signal as _signal
import sys as _sys

from . import _core
from . import signals as _signals  # installs the handlers
from ._core import GuardedFunction
from .faults import (
    ArithmeticFault, BusError, ForeignAbort, ForeignFault, ForeignStackOverflow,
    ForeignTimeout, IllegalInstruction, LibraryQuarantined, ProtectionKeyViolation,
    SegmentationFault, UnsupportedPlatform,
)
# Stopping a hung call (Ctrl-C, timeouts): issue 16
from .interrupt import ForeignInterrupt, get_default_interruptible, set_default_interruptible
from . import for_ctypes as _for_ctypes
from .for_ctypes import CDLL, cdll
from .everything import install, installed, uninstall
from .for_cffi_compiled import UnguardedModule, guarded_modules, unguarded
from .policy import get_default_policy, release, set_default_policy
from . import policy as _policy
# shield mode: ffiguard.shield is the package and, called, shield(buffer, access=...)
from . import shield
from .shield import protected_buffer, unshield, shield_interpreter, ShieldUnavailable
from . import report as _report

__version__ = "0.1.0"

__all__ = [
    "CDLL", "cdll", "guard", "GuardedFunction", "stats", "crashers_path",
    "install", "uninstall", "installed",
    # compiled cffi modules (API mode): which are guarded
    "unguarded", "guarded_modules", "UnguardedModule",
    "ForeignFault", "SegmentationFault", "ForeignStackOverflow", "BusError",
    "IllegalInstruction", "ArithmeticFault", "ForeignAbort", "LibraryQuarantined",
    "UnsupportedPlatform", "set_default_policy", "get_default_policy", "release",
    # shield mode:
    "shield", "unshield", "protected_buffer", "ProtectionKeyViolation",
    "shield_interpreter", "ShieldUnavailable",
    # stopping a hung call (trap mode's and isolate mode's ForeignTimeout):
    "ForeignInterrupt", "ForeignTimeout", "set_default_interruptible",
    "get_default_interruptible",
    # isolate mode (loaded on first use):
    "IsolatedCDLL", "foreign_buffer", "foreign_new", "ForeignExit",
    "HelperDied", "HelperUnavailable", "StaleHandle",
]

_ISOLATE_NAMES = frozenset(__all__[-7:])


def __getattr__(name):
    # isolate mode costs ~10 ms to import (a C extension, the helper machinery): only
    # programs that use it pay.
    if name in _ISOLATE_NAMES:
        from . import isolate
        return getattr(isolate, name)
    if name == "GuardedLibrary":  # imports cffi's backend: only when asked for
        from .for_cffi import GuardedLibrary
        return GuardedLibrary
    raise AttributeError("module 'ffiguard' has no attribute %r" % name)


def guard(obj, *args, **kwargs):
    """Guard foreign calls: a fault inside one raises ffiguard.ForeignFault.

    * ``guard(func, name=None, policy=None)``: a ctypes function object (from a CDLL, or
      a CFUNCTYPE prototype) -> a GuardedFunction (the original keeps working, unguarded).
    * ``guard(lib, on_fault=None)`` / ``guard(ffi, lib, on_fault=None)``: a cffi library
      (``ffi.dlopen(...)``, or a compiled module's ``lib``) -> a guarded library with the
      same functions, constants and variables (see ffiguard.for_cffi.GuardedLibrary).
    * ``guard(fp, name=None, on_fault=None)``: a cffi function pointer cdata.

    Guarding something already guarded returns it unchanged.
    """
    if isinstance(obj, (_ctypes._CFuncPtr, GuardedFunction)):
        return _for_ctypes.guard(obj, *args, **kwargs)
    if "_cffi_backend" in _sys.modules:  # a cffi object is possible only once cffi is loaded
        from . import for_cffi
        if for_cffi.is_cffi_object(obj):
            return for_cffi.guard(obj, *args, **kwargs)
    if isinstance(obj, _ctypes.CDLL):
        hint = "; for a whole ctypes library use ffiguard.CDLL(path)"
    else:
        hint = ""
    raise TypeError("guard() takes a ctypes function object, a cffi library (guard(lib) or "
                    "guard(ffi, lib)) or a cffi function pointer, not %s%s"
                    % (type(obj).__name__, hint))


def stats():
    """Faults recovered in this process so far:
    {"recovered": n, "by_signal": {...}, "suspect": n}.

    Every recovered fault interrupted foreign code mid-way; a growing count is a reason
    to distrust the process's state (see ForeignFault). "suspect" counts the faults
    inside the C library's allocator or stdio (see ffiguard.policy): after one of those,
    the whole process is suspect, not just the faulting library."""
    by_signal = {s.name: _core.recovered(int(s)) for s in _signals.ALL}
    return {"recovered": _core.recovered(0), "by_signal": by_signal,
            "suspect": _policy.suspect_count()}


def crashers_path():
    """Path of the shared library of deliberate faults used by the demo and the tests."""
    return _importlib_util.find_spec("ffiguard._crashers").origin


_report.install_excepthook()  # Python 3.10 only: print the native backtrace notes

del _signal
