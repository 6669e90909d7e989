"""Guarded ctypes: ffiguard.CDLL, ffiguard.cdll and ffiguard.guard().

Guarding a ctypes function object points it at a stub (a few bytes of generated code
that jump to the guard thunk with the real target) and wraps it in a GuardedFunction,
which arms the guard for each call and raises the ForeignFault afterwards. ctypes keeps
doing all the argument conversion, so everything ctypes supports keeps working. The
function object itself stays usable: called directly (or through a C pointer to it) the
stub just jumps to the target, unguarded.
"""
import ctypes
import platform
import sys
import threading

from . import _core
from .faults import UnsupportedPlatform
from .policy import check_on_fault
from .interrupt import resolve_interruptible

__all__ = ["CDLL", "cdll", "guard"]

_stubs = {}  # target address -> stub address, so a function is stubbed once
# Making a stub is a check-then-set: without a lock two threads (no GIL in free-threaded
# builds, and a thread switch between the two steps in any build) could both make one.
_stubs_lock = threading.Lock()


def _check_supported():
    if not _core.SUPPORTED:
        raise UnsupportedPlatform(
            "ffiguard has no guard for %s on %s yet (supported: Linux x86-64 and AArch64); "
            "foreign calls would run unprotected, so ffiguard refuses them"
            % (platform.machine(), sys.platform))


def _stub_for(target):
    """The guard stub for `target` (made once per target, shared by ctypes and cffi)."""
    stub = _stubs.get(target)  # a lock-free read first: the common case
    if stub is None:
        with _stubs_lock:
            stub = _stubs.get(target)
            if stub is None:
                stub = _stubs[target] = _core.stub(target)
    return stub


def _retarget(func):
    """Point a ctypes function object at the guard stub for its target; return the target."""
    cell = ctypes.c_void_p.from_address(ctypes.addressof(func))
    address = cell.value
    if not address:
        raise ValueError("cannot guard a NULL function pointer")
    target = _core.stub_target(address)
    if target is None:  # not yet pointing at a stub
        target = address
        cell.value = _stub_for(target)
    return target


def _target_of(wrapped):
    """The foreign function a guarded ctypes function object or cffi pointer calls (it
    already points at its stub)."""
    if isinstance(wrapped, ctypes._CFuncPtr):
        stub = ctypes.c_void_p.from_address(ctypes.addressof(wrapped)).value
    else:  # a cffi function pointer
        from .for_cffi import _UINTPTR, _backend
        stub = int(_backend.cast(_UINTPTR, wrapped))
    return _core.stub_target(stub)


def guard(func, name=None, policy=None, shield=None, interruptible=None, timeout=None):
    """Return a GuardedFunction that calls the ctypes function object `func`.

    A fault inside the call raises an ffiguard.ForeignFault subclass instead of killing
    the process. `name` is used in reports (default: func.__name__). `policy` (a
    _core.Policy, normally the library's) decides what happens after a fault. `shield`
    (default True): its calls lock memory shielded with ffiguard.shield(); False keeps
    the plain hot path. `interruptible` (default: set_default_interruptible()'s): Ctrl-C
    stops a call on the main thread (ForeignInterrupt); `timeout` (seconds, default
    None): a call that runs longer is stopped (ForeignTimeout). Guarding an already
    guarded function returns it unchanged (with `shield`, `interruptible` or `timeout`
    given and different: a new GuardedFunction of the same function).
    """
    if isinstance(func, _core.GuardedFunction):
        same = ((shield is None or bool(shield) == func.__shield__) and
                (interruptible is None or bool(interruptible) == func.interruptible) and
                (timeout is None or timeout == func.timeout))
        if same:
            return func
        return _core.GuardedFunction(
            func.__wrapped__, func.__guarded_name__, func.__policy__, _target_of(func.__wrapped__),
            func.__shield__ if shield is None else bool(shield),
            func.interruptible if interruptible is None else bool(interruptible),
            func.timeout if timeout is None else timeout)
    if not isinstance(func, ctypes._CFuncPtr):
        raise TypeError("guard() takes a ctypes function object (from a CDLL, or a CFUNCTYPE "
                        "prototype), not %s" % type(func).__name__)
    _check_supported()
    if func._flags_ & ctypes._FUNCFLAG_PYTHONAPI:
        raise TypeError("functions from PyDLL/pythonapi run Python's own C API with the GIL "
                        "held; ffiguard does not guard them")
    interruptible = resolve_interruptible(interruptible)
    target = _retarget(func)
    return _core.GuardedFunction(func, name, policy, target, True if shield is None else bool(shield),
                                 interruptible, timeout)


def make_policy(name, on_fault):
    """The shared _core.Policy for a library; on_fault=None follows the global default."""
    if on_fault is not None:
        check_on_fault(on_fault)
    return _core.Policy(name, on_fault)


MODES = ("trap", "isolate")


class CDLL(ctypes.CDLL):
    """ctypes.CDLL whose functions are guarded: a fault inside one raises
    ffiguard.ForeignFault instead of killing the process.

    Takes the same arguments as ctypes.CDLL, plus on_fault ("raise", "quarantine" or
    "exit"; default: the global policy) for what happens after a fault, and shield
    (default True; False: its calls never lock memory shielded with ffiguard.shield()),
    interruptible (Ctrl-C stops its calls on the main thread: ForeignInterrupt; default:
    set_default_interruptible()'s) and timeout (seconds: a call that runs longer is
    stopped, ForeignTimeout; per function: lib.f.timeout). `mode` is
    ctypes' dlopen flags when an int, or ffiguard's mode when a str: "trap" (the
    default: guarded calls in this process) or "isolate" (the library runs in a helper
    process: see ffiguard.isolate.IsolatedCDLL for its options, e.g. timeout=).
    """

    def __new__(cls, name, mode=ctypes.DEFAULT_MODE, *args, **kwargs):
        if isinstance(mode, str) and mode != "trap":
            if mode != "isolate":
                raise ValueError("mode must be one of %s (or ctypes' int dlopen flags), not %r"
                                 % (", ".join(MODES), mode))
            from .isolate import IsolatedCDLL  # imported on first use: ~10 ms
            if args:
                raise TypeError("mode='isolate' takes keyword options only (timeout=, "
                                "restart=, limits=, ...)")
            return IsolatedCDLL(name, **kwargs)
        return super().__new__(cls)

    def __init__(self, name, mode=ctypes.DEFAULT_MODE, *args, on_fault=None, shield=True,
                 interruptible=None, timeout=None, **kwargs):
        _check_supported()
        if mode == "trap":
            mode = ctypes.DEFAULT_MODE
        self._ffiguard_policy = make_policy(name, on_fault)
        self._ffiguard_shield = bool(shield)  # shield=False: calls never lock shielded memory
        # interrupt (issue 16): Ctrl-C / timeout for its functions (each can change its own)
        self._ffiguard_interruptible = resolve_interruptible(interruptible)
        _core.GuardedFunction(len, timeout=timeout)  # a bad timeout is refused here, not at the first call
        self._ffiguard_timeout = timeout
        super().__init__(name, mode, *args, **kwargs)

    def __getitem__(self, name_or_ordinal):
        return guard(super().__getitem__(name_or_ordinal), policy=self._ffiguard_policy,
                     shield=self._ffiguard_shield, interruptible=self._ffiguard_interruptible,
                     timeout=self._ffiguard_timeout)


cdll = ctypes.LibraryLoader(CDLL)
