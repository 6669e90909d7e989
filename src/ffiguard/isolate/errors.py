"""Exceptions of isolate mode.  All are ffiguard.ForeignFault subclasses, so
``except ffiguard.ForeignFault`` catches every way a foreign call can fail.

A fault the helper survived (its ffiguard trap caught it) comes back as exactly the
trap-mode class (SegmentationFault, ForeignAbort, ...) with every attribute of the
helper's fault record.  When the helper process itself dies the host raises a
HelperDied subclass: ForeignExit for exit(n), and for a death by signal a class that
is both HelperDied and the trap-mode class for that signal (e.g. HelperAborted is a
ForeignAbort), or plain HelperDied for signals without one (SIGKILL, SIGXCPU, ...).
"""
import signal as _signal

from ..faults import (
    ArithmeticFault, BusError, ForeignAbort, ForeignFault, IllegalInstruction,
    SegmentationFault,
)
# The same class as trap mode's timeouts (interrupt, issue 16): defined in faults, so
# that importing it does not load isolate mode.
from ..faults import ForeignTimeout

__all__ = [
    "HelperDied", "HelperProtocolError", "ForeignExit", "ForeignTimeout", "HelperUnavailable",
    "StaleHandle",
    "HelperSegmentationFault", "HelperBusError", "HelperIllegalInstruction",
    "HelperArithmeticFault", "HelperAborted", "died",
]


def _extra(name):
    return property(lambda self: self._values.get(name), doc=name)


class _Extra:
    """Attributes beyond ForeignFault's, kept by pickling too."""

    _extra_names = ()

    def __reduce__(self):
        rebuild, (cls, values), *rest = ForeignFault.__reduce__(self)
        values = dict(values)
        for name in self._extra_names:
            values[name] = self._values.get(name)
        return (rebuild, (cls, values), *rest)


class HelperDied(_Extra, ForeignFault):
    """The helper process running an isolated library died during the call.

    ``exit_code`` (int or None) or ``signal`` (how it died), ``pid``, ``function``.
    No native backtrace: the process is gone (faults inside the call are normally
    trapped in the helper and raised with their backtrace instead)."""

    _extra_names = ("exit_code", "pid")
    exit_code = _extra("exit_code")
    pid = _extra("pid")


class HelperProtocolError(HelperDied):
    """The helper wrote something into the shared call slot that the protocol does not
    allow (a state word that is no state, a reply length out of bounds, ...), as a
    foreign library scribbling over memory would: the helper was killed."""


class ForeignExit(HelperDied):
    """The isolated library called exit() (or _exit()): ``exit_code`` says with what."""


class HelperUnavailable(ForeignFault):
    """The library's helper is gone and restart="never" forbids starting another
    (call the library's restart() to start one explicitly)."""


class StaleHandle(ForeignFault, ValueError):
    """A pointer handle returned by an earlier helper was passed to a new one (the
    helper restarted: the memory it pointed to no longer exists)."""


class HelperSegmentationFault(SegmentationFault, HelperDied):
    """The helper died of SIGSEGV outside any trapped call (e.g. in a library thread)."""


class HelperBusError(BusError, HelperDied):
    """The helper died of SIGBUS."""


class HelperIllegalInstruction(IllegalInstruction, HelperDied):
    """The helper died of SIGILL."""


class HelperArithmeticFault(ArithmeticFault, HelperDied):
    """The helper died of SIGFPE."""


class HelperAborted(ForeignAbort, HelperDied):
    """The helper died of SIGABRT outside a trapped call."""


_BY_SIGNAL = {
    _signal.SIGSEGV: HelperSegmentationFault,
    _signal.SIGBUS: HelperBusError,
    _signal.SIGILL: HelperIllegalInstruction,
    _signal.SIGFPE: HelperArithmeticFault,
    _signal.SIGABRT: HelperAborted,
}

_REASONS = {
    _signal.SIGKILL: "killed (SIGKILL: by someone, or the kernel's OOM killer)",
    _signal.SIGXCPU: "out of CPU time (RLIMIT_CPU)",
}


def died(returncode, pid, function, library, why=None):
    """The exception for a helper that ended with Popen-style `returncode`."""
    if returncode is None:
        sig, code = None, None
        text = "the helper process (pid %d) of %s vanished" % (pid, library)
    elif returncode < 0:
        try:
            sig = _signal.Signals(-returncode)
        except ValueError:
            sig = -returncode
        code = None
        name = getattr(sig, "name", str(sig))
        text = "the helper process (pid %d) of %s died of %s" % (
            pid, library, _REASONS.get(sig, name))
    else:
        sig, code = None, returncode
        text = "the isolated library %s exited with status %d (helper pid %d)" % (
            library, returncode, pid)
    if why:
        text += " " + why
    if function:
        text += " during call to %s" % function
    if code is not None:
        cls = ForeignExit
    else:
        cls = _BY_SIGNAL.get(sig, HelperDied)
    return cls(text, signal=sig, exit_code=code, pid=pid, function=function,
               code=None, code_name=None, address=None, pc=None, library=None,
               symbol=None, frames=[], registers={}, access=None, sp=None)
