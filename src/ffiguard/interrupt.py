"""Stopping a hung foreign call: Ctrl-C and timeouts (issue 16).

A guarded call made interruptible (``ffiguard.CDLL(..., interruptible=True)``,
``guard(f, interruptible=True)``, ``lib.f.interruptible = True``,
``set_default_interruptible()``) is stopped by Ctrl-C while it runs on the main thread,
and raises ForeignInterrupt, a KeyboardInterrupt that also carries what a ForeignFault
carries (pc, function, library, symbol, frames, ``report()``: where it hung). One with a
timeout (``timeout=`` seconds, per library or per function as ``lib.f.timeout``, the
same spelling as isolate mode) is stopped when it runs longer, on any thread, and raises
ForeignTimeout (isolate mode's class). The C side is ``_core/interrupt.c``; how and why:
docs/design.md, "Stopping a hung call".

Stopping foreign code is as dangerous as a fault: it may hold a lock, its data may be
half-updated. The library's on_fault policy applies (quarantine, exit), and so does the
suspect-state verdict (stopped inside the C allocator or stdio).
"""
import _signal as _c_signal
import signal as _signal
import threading as _threading

from . import _core
from .faults import (REC_FRAMES, REC_SIGNAL, ForeignFault, ForeignTimeout, _field, _init_fields,
                     _stop_message)
from .policy import after_fault as _after_fault

__all__ = ["ForeignInterrupt", "ForeignTimeout", "set_default_interruptible",
           "get_default_interruptible", "resolve_interruptible", "signal_number", "stopped"]


class ForeignInterrupt(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped an interruptible guarded foreign call.

    A KeyboardInterrupt (so ``except Exception`` does not catch it, and a program that
    handles Ctrl-C handles this one) with ForeignFault's attributes: ``signal``
    (SIGINT), ``pc``, ``sp``, ``function``, ``library``, ``symbol``, ``frames``,
    ``registers``, ``report()`` and the native backtrace in ``__notes__``. The foreign
    code was stopped in the middle of what it was doing (see ForeignFault)."""

    def __init__(self, message=None, **fields):
        super().__init__()
        _init_fields(self, message, fields)


# ForeignFault's attributes and methods, shared (a KeyboardInterrupt cannot also be a
# ForeignFault, which is an Exception). Its __init__ is the one thing not taken: it
# names ForeignFault in super().
for _name, _value in vars(ForeignFault).items():
    if _name not in ("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__init__"):
        setattr(ForeignInterrupt, _name, _value)
ForeignInterrupt.message = _field("message", lambda self: _stop_message(self, "stopped by Ctrl-C (SIGINT)"))
ForeignInterrupt.code_name = _field("code_name", lambda self: None)
del _name, _value


_default = False
_default_lock = _threading.Lock()


def set_default_interruptible(interruptible=True):
    """Make functions guarded from now on interruptible by Ctrl-C (on the main thread)
    unless they say otherwise (``interruptible=False``); returns the previous default.
    Functions already guarded keep what they have (``lib.f.interruptible`` changes one)."""
    global _default
    with _default_lock:
        previous, _default = _default, bool(interruptible)
    return previous


def get_default_interruptible():
    """The default for functions guarded without ``interruptible=``."""
    return _default


def resolve_interruptible(interruptible):
    """``interruptible`` as given, or the default when None."""
    return _default if interruptible is None else bool(interruptible)


def signal_number():
    """The real-time signal ffiguard's per-thread timers send (the highest one with no
    handler when first needed; chosen and installed now if it was not yet)."""
    return _core.interrupt_signal()


def stopped():
    """How many guarded calls Ctrl-C or a timeout stopped so far in this process."""
    return _core.stopped()


def from_record(record, function, args=(), kwnames=None, policy=None, timeout=None):
    """The exception for a stopped call's record (called by _core): ForeignInterrupt for
    Ctrl-C, ForeignTimeout for a timeout; then the library's policy."""
    cls = ForeignInterrupt if record[REC_SIGNAL] == _signal.SIGINT else ForeignTimeout
    exc = BaseException.__new__(cls)
    exc._raw = record
    exc._values = {"function": function}
    if cls is ForeignTimeout:
        exc._values["timeout"] = timeout
    exc._call = (args, kwnames)
    return _after_fault(exc, record[REC_FRAMES], policy)


# _signal.getsignal, the C function: signal.getsignal wraps it in Python (and converts
# SIG_DFL/SIG_IGN to enums by raising and catching ValueError for any other handler:
# ~20,000 instructions per interruptible call, measured with callgrind).
_core._intr_setup(_c_signal.getsignal, _signal.default_int_handler, _threading.main_thread().ident,
                  from_record)
