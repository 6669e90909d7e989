"""shield mode: memory the host names is locked while guarded foreign calls run.

    buf = ffiguard.protected_buffer(1 << 20)          # page-aligned, shielded read-only
    ffiguard.shield(some_mmap, access="none")          # or any writable whole-page buffer
    lib = ffiguard.CDLL("libfoo.so")                   # its guarded calls cannot write buf
    try:
        lib.scribble(...)
    except ffiguard.ProtectionKeyViolation as e:       # buf unchanged; e.address, e.pkey
        ...

While a shielded buffer is locked for guarded foreign calls, Python code on every thread
reads and writes it as usual. With protection keys (x86-64 CPUs with PKU) locking costs
two register writes per call and no system call; without them (most VMs, AArch64) every
shielded call mprotects every shielded region twice: correct, slow, and process-wide
(see the README, "shield"). Not a security boundary: native code can change its own
PKRU, and system calls (read(2), /proc/self/mem) ignore both mechanisms.

``ffiguard.shield_interpreter()`` (protection keys only) puts the interpreter's own
small-object heap under a key too: see shield_interpreter() and the README.
"""
import contextlib
import ctypes
import mmap
import os
import signal
import sys
import sysconfig
import threading
import types

from .. import _core
from .. import faults as _faults
from ..faults import ProtectionKeyViolation, UnsupportedPlatform

__all__ = ["shield", "unshield", "protected_buffer", "shielded", "callback", "mechanism",
           "ProtectionKeyViolation", "ACCESS", "shield_interpreter", "interpreter_shielded",
           "interpreter_availability", "unprotected", "ShieldUnavailable"]

ACCESS = {"read-only": 1, "none": 2}  # -> shield.c's enum ffg_shield_access
PAGE = mmap.PAGESIZE
SEGV_PKUERR = 4

_lock = threading.Lock()
_regions = {}  # start address -> _Region


class _Region:
    __slots__ = ("start", "length", "access", "pkey", "pin", "obj")

    def __init__(self, start, length, access, pkey, pin, obj):
        self.start, self.length, self.access, self.pkey = start, length, access, pkey
        self.pin, self.obj = pin, obj  # the export keeps the memory from moving or closing


def mechanism():
    """("pkeys" | "mprotect", reason): how this machine shields memory, and why."""
    return _core.shield_mechanism()


def _span(buffer):
    """(start, length, pin) of a writable buffer covering whole pages; a ValueError that
    names the page boundaries otherwise."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError("shield() takes a writable buffer (protected_buffer(), mmap, "
                        "bytearray, numpy array...), not %s" % type(buffer).__name__) from None
    with view:
        if view.readonly:
            raise TypeError("shield() needs a writable buffer; %s is read-only"
                            % type(buffer).__name__)
        if not view.c_contiguous:
            raise ValueError("shield() needs a contiguous buffer")
        size = view.nbytes
    if size == 0:
        raise ValueError("shield() of an empty buffer")
    pin = (ctypes.c_char * size).from_buffer(buffer)
    start = ctypes.addressof(pin)
    length = size
    if isinstance(buffer, mmap.mmap) and start % PAGE == 0:
        # A mapping always covers its last page whole: the rest of it is the mmap's too.
        length = -(-size // PAGE) * PAGE
    if start % PAGE or length % PAGE:
        del pin  # the error's traceback must not keep the buffer exported
        first = -(-start // PAGE) * PAGE
        last = (start + length) // PAGE * PAGE
        inside = ("the whole pages inside it are 0x%x-0x%x" % (first, last) if last > first
                  else "it contains no whole page")
        raise ValueError(
            "shield() needs memory that covers whole pages (%d bytes each): this %s is "
            "0x%x-0x%x (%d bytes), %s; use ffiguard.protected_buffer(size) for a "
            "page-aligned buffer" % (PAGE, type(buffer).__name__, start, start + size, size,
                                     inside))
    return start, length, pin


def shield(buffer, access="read-only"):
    """Lock `buffer` against guarded foreign calls; returns `buffer`.

    access="read-only": guarded calls may read it but not write it; "none": they may
    not read it either (a secret cannot leak through a foreign over-read). A violation
    raises ProtectionKeyViolation and leaves the bytes unchanged. Python code (any
    thread) keeps reading and writing it normally. `buffer` must be writable and cover
    whole pages (protected_buffer(), an mmap, a large page-aligned numpy array); it
    cannot be resized or closed until unshield(buffer)."""
    if access not in ACCESS:
        raise ValueError("access must be one of %s, not %r" % (", ".join(map(repr, ACCESS)),
                                                               access))
    start, length, pin = _span(buffer)
    with _lock:
        if start in _regions:
            raise ValueError("this memory (0x%x) is already shielded" % start)
        pkey = _core.shield_add(start, length, ACCESS[access])
        _regions[start] = _Region(start, length, access, pkey, pin, buffer)
    _install_classifier()
    return buffer


def unshield(buffer):
    """Undo shield(buffer): guarded calls may touch it again."""
    with memoryview(buffer) as view:
        size = view.nbytes
    pin = (ctypes.c_char * max(size, 1)).from_buffer(buffer)
    start = ctypes.addressof(pin)
    del pin
    with _lock:
        region = _regions.get(start)
        if region is None:
            raise ValueError("this buffer is not shielded")
        _core.shield_remove(region.start, region.length)
        del _regions[start]


def shielded():
    """[(start, length, access, pkey)] of the shielded regions (pkey None under the
    mprotect fallback)."""
    with _lock:
        return [(r.start, r.length, r.access, r.pkey) for r in _regions.values()]


def protected_buffer(size, access="read-only"):
    """A new zero-filled, page-aligned buffer of `size` bytes (an anonymous mmap: index,
    slice, len, buffer protocol), already shielded with `access`. unshield() it before
    closing it."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError("protected_buffer() needs a positive size, not %r" % (size,))
    return shield(mmap.mmap(-1, size), access)


def callback(func):
    """Wrap a Python function used as a ctypes/cffi callback from shielded calls: it runs
    with shielded memory open and the caller's locks are put back when it returns.

    Plain callbacks work too (their first touch of shielded memory opens it for the
    thread: see docs/design.md), but then the rest of that foreign call runs unlocked;
    with this wrapper it is locked again after the callback."""
    open_, restore = _core.shield_open, _core.shield_restore

    def shielded_callback(*args):
        saved = open_()
        try:
            return func(*args)
        finally:
            restore(saved)

    shielded_callback.__wrapped__ = func
    shielded_callback.__name__ = getattr(func, "__name__", "callback")
    return shielded_callback


def _classify(record):
    """For faults.from_record: the pkey (None under the fallback) when the fault is a
    shield violation, else False."""
    if record[_faults.REC_CODE] == SEGV_PKUERR:
        return _core.shield_fault_pkey()
    address = record[_faults.REC_ADDRESS]
    if address is not None:
        with _lock:  # no GIL to rely on (free-threaded builds)
            for region in _regions.values():
                if region.start <= address < region.start + region.length:
                    return region.pkey
    return False


def _install_classifier():
    _faults.shield_classify = _classify


# ---- the interpreter's heap: shield_interpreter() -------------------------------------


class ShieldUnavailable(UnsupportedPlatform):
    """shield_interpreter() cannot work on this machine or interpreter; the message (also
    ``reason``) says why."""

    def __init__(self, reason):
        super().__init__("ffiguard.shield_interpreter() is not available: %s" % reason)
        self.reason = reason


# PYTHONMALLOC values whose small objects do not come from pymalloc's arenas.
_NOT_PYMALLOC = ("malloc", "malloc_debug", "mimalloc", "mimalloc_debug")

_interpreter_key = None
_interpreter_lock = threading.Lock()


def interpreter_availability():
    """(True, how) if shield_interpreter() can work here, else (False, why not)."""
    if _interpreter_key is not None:
        return True, "on: the interpreter's arenas since then have protection key %d" % (
            _interpreter_key,)
    if not _core.SUPPORTED:
        return False, "ffiguard does not support this architecture (%s)" % _core.ARCH
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return False, ("this is a free-threaded build: its objects live in mimalloc heaps, "
                       "which have no arena allocator hook to put under a protection key")
    if not sysconfig.get_config_var("WITH_PYMALLOC"):
        return False, "this interpreter is built without pymalloc (no small-object arenas)"
    env = "" if sys.flags.ignore_environment else os.environ.get("PYTHONMALLOC", "")
    if env in _NOT_PYMALLOC:
        return False, ("PYTHONMALLOC=%s: small objects do not come from pymalloc's arenas"
                       % env)
    from .. import signals as _signals
    if int(signal.SIGSEGV) not in {int(s) for s in _signals.TRAPPED}:
        return False, ("ffiguard does not trap SIGSEGV (signals.select()): its handler "
                       "opens the interpreter's key for threads older than it")
    kind, reason = mechanism()
    if kind != "pkeys":
        return False, ("it needs protection keys, and this machine uses the %s" % reason)
    return True, "available (%s)" % reason


def shield_interpreter():
    """Put the interpreter's small-object heap under a protection key that guarded
    foreign calls (with shield on) cannot write: a wild write into a Python object
    raises ProtectionKeyViolation instead of corrupting it. Returns the key.

    Covers pymalloc's arenas allocated from now on (objects of <= 512 bytes, 3.11+ frame
    stacks); arenas from before, larger objects and buffers from the C allocator stay
    writable. ctypes objects are created outside the protected arenas, so
    out-parameters, byref(), arrays and string buffers keep working (cffi's ffi.new()
    never uses the arenas: it allocates with malloc); use
    ``with ffiguard.shield.unprotected():`` for other memory foreign code must write
    (a bytearray handed to it through from_buffer, say). Once on, it stays on for the
    process. Call it early: a thread that
    existed before it gets the key opened on its first touch of a new arena (a fault the
    handler absorbs), but a system call made by such a thread into one (os.read into a
    new bytes object) fails with EFAULT until then.

    Needs protection keys (x86-64 with PKU), pymalloc, and a build with a GIL:
    ShieldUnavailable (a RuntimeError) says which is missing."""
    global _interpreter_key
    with _interpreter_lock:
        if _interpreter_key is not None:
            return _interpreter_key
        ok, why = interpreter_availability()
        if not ok:
            raise ShieldUnavailable(why)
        _install_classifier()  # a violation is a ProtectionKeyViolation from the start
        # ctypes first: no ctypes object another thread makes may land in an arena
        # under the key (the wrappers do nothing until the allocator hooks exist).
        _wrap_ctypes()
        try:
            key = _core.shield_heap_enable()
        except RuntimeError as e:
            raise ShieldUnavailable(str(e)) from None
        _interpreter_key = key
    return key


def interpreter_shielded():
    """The interpreter's key if shield_interpreter() is on, else None."""
    return _interpreter_key


def _wrap_ctypes():
    """ctypes' data types (every subclass that exists; later ones get it from the
    metatypes) create their objects outside the protected arenas: inline values and
    small buffers that foreign code writes through byref(), pointers and arrays."""
    bases = [ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array,
             ctypes._Pointer, ctypes._CFuncPtr]
    for meta in {type(b) for b in bases}:
        _core.shield_heap_wrap_new(meta, True)  # the classes it makes from now on
    seen = set()
    while bases:
        cls = bases.pop()
        if cls in seen:
            continue
        seen.add(cls)
        try:
            _core.shield_heap_wrap_new(cls)
        except TypeError:
            pass  # a subclass that cannot be instantiated (abstract): nothing to move
        bases.extend(type.__subclasses__(cls))


@contextlib.contextmanager
def unprotected():
    """Objects this thread creates inside the block are allocated outside the arenas
    shield_interpreter() protects (e.g. a bytearray handed to foreign code that writes
    it). Harmless without shield_interpreter()."""
    _core.shield_heap_outside(1)
    try:
        yield
    finally:
        _core.shield_heap_outside(-1)


class _ShieldModule(types.ModuleType):
    """ffiguard.shield is this package and, called, the function shield(): one name for
    both, as the API promises (``ffiguard.shield(buf)``, ``ffiguard.shield.callback``)."""

    def __call__(self, buffer, access="read-only"):
        return shield(buffer, access)


sys.modules[__name__].__class__ = _ShieldModule
