"""The message glibc wrote before aborting ("free(): invalid pointer", a failed assert's
"prog: file.c:10: f: Assertion `x > 0' failed."), for ForeignAbort.abort_message.

glibc keeps that text for debuggers: before abort(), __libc_message (the allocator's
checks, fortify failures) and __assert_fail put it in a fresh anonymous mapping and
store the mapping in the libc-private global

    struct abort_msg_s { unsigned int size; char msg[]; } *__abort_msg;

(stdlib/abort.c, exported as __abort_msg@@GLIBC_PRIVATE: gdb and crash reporters read
it; checked here on glibc 2.36, not on a newer glibc: if a later one changes it, the
message is simply absent, see read()). `size` is the whole mapping's
length and `msg` is NUL-terminated; a newer message replaces the pointer (the old
mapping is then unmapped), and nothing ever clears it. So:

* it is read here, after the recovery, in Python, once per SIGABRT (take(), called
  when the fault path makes the ForeignAbort: ForeignAbort.__new__), never in the
  signal handler;
* the pointer is compared with the one seen at the previous SIGABRT: the message is
  this abort's only if the pointer changed (a plain abort() leaves it as it was);
* the bytes are read only inside a readable mapping (/proc/self/maps), bounded by
  `size` and by the mapping's end, so a damaged pointer gives no message, not a crash.

On a C library without __abort_msg (musl, ...) there is no message (None).
"""
import ctypes
import threading

__all__ = ["take", "read"]

_HEADER = ctypes.sizeof(ctypes.c_uint)  # struct abort_msg_s: the size field, then msg
MAX_MESSAGE = 1 << 16  # bytes read at most

_lock = threading.Lock()
_cell = None  # the c_void_p that is __abort_msg, or False where there is none
_last = None  # its value at the previous SIGABRT


def _pointer():
    global _cell
    if _cell is None:
        try:
            from .everything import _ORIGINAL_CDLL

            _cell = ctypes.c_void_p.in_dll(_ORIGINAL_CDLL(None), "__abort_msg")
        except (OSError, ValueError):
            _cell = False
    return _cell.value if _cell else None


def read(address):
    """The message at a struct abort_msg_s address, or None if it cannot be read."""
    from .report import read_maps

    if not address:
        return None
    mapping = next((m for m in read_maps() if m[0] <= address < m[1]), None)
    if mapping is None or mapping[2][:1] != "r" or address + _HEADER > mapping[1]:
        return None
    size = ctypes.c_uint.from_address(address).value
    length = min(size, mapping[1] - address, MAX_MESSAGE) - _HEADER
    if length <= 0:
        return None
    raw = ctypes.string_at(address + _HEADER, length).split(b"\0", 1)[0]
    text = raw.decode("utf-8", "replace").strip()
    return text or None


def take():
    """The message of the SIGABRT just recovered, or None if that abort wrote none:
    called once per SIGABRT, in order, when its ForeignAbort is made."""
    global _last
    with _lock:
        address = _pointer()
        fresh = address is not None and address != _last
        _last = address
        return read(address) if fresh else None
