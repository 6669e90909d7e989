"""The foreign heap: shared memory mapped at the same address in the host and in every
helper process, so that a pointer into it is valid on both sides (zero-copy buffers).

One heap per host process, created on first use (a forked child gets its own, see
_after_fork_in_child): a memfd of FFIGUARD_HEAP_SIZE bytes
(default 256 MiB of address space; pages cost memory only once touched), mapped at an
address picked in a range ordinary mappings do not use, with MAP_FIXED_NOREPLACE so
that the helpers can map it at the same place.  The host alone allocates in it
(first fit over a sorted free list, 64-byte granules, coalescing on free); isolate
mode also uses it for arguments too large for a call slot.
"""
import bisect
import ctypes
import os
import random
import threading
import weakref

from .. import _isolate

__all__ = ["foreign_buffer", "foreign_new", "in_foreign_heap", "heap"]

GRANULE = 64
LEASES_SIZE = 4096
DEFAULT_SIZE = 256 << 20


class ForeignHeap:
    def __init__(self, size):
        self.size = size = (size + 0xFFFF) & ~0xFFFF
        self.fd = os.memfd_create("ffiguard-heap", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.base = self._map(size)
        self.end = self.base + size
        self._lock = threading.Lock()
        self.orphaned = False  # a forked child's copy of its parent's heap
        # The first page holds the spin leases (see ffiguard/_isolate/transport.c).
        self._free_offsets = [LEASES_SIZE]  # sorted
        self._free_sizes = {LEASES_SIZE: size - LEASES_SIZE}
        self.in_use = 0

    def _map(self, size):
        # Far below the top-down mmap area and far above the program's heap: a fresh
        # helper almost certainly has nothing there.  Try a few random spots.
        for _ in range(16):
            hint = (0x300000000000 + random.randrange(0, 1 << 32) * 4096) & ~0xFFFF
            try:
                return _isolate.map_shared(self.fd, size, hint)
            except OSError:
                continue
        raise OSError("ffiguard: could not place the foreign heap")

    def contains(self, address, n):
        return self.base <= address and address + n <= self.end

    def alloc(self, n):
        n = max(GRANULE, (n + GRANULE - 1) & ~(GRANULE - 1))
        if self.orphaned:
            raise RuntimeError("ffiguard: the foreign heap of the parent process (after fork)")
        with self._lock:
            for off in self._free_offsets:
                size = self._free_sizes[off]
                if size >= n:
                    self._free_offsets.remove(off)
                    del self._free_sizes[off]
                    if size > n:
                        bisect.insort(self._free_offsets, off + n)
                        self._free_sizes[off + n] = size - n
                    self.in_use += n
                    return self.base + off, n
        raise MemoryError("ffiguard foreign heap exhausted (%d bytes in use of %d; set "
                          "FFIGUARD_HEAP_SIZE)" % (self.in_use, self.size))

    def _orphan(self):
        """In a forked child: this is the parent's heap.  Nothing is allocated from it
        any more (the child gets a heap of its own); buffers made before the fork stay
        mapped, shared with the parent, and freeing them does nothing here."""
        self.orphaned = True
        self._lock = threading.Lock()  # (another thread may have held it at the fork)
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1

    def free(self, address, n):
        off = address - self.base
        if self.orphaned:
            return
        with self._lock:
            self.in_use -= n
            i = bisect.bisect(self._free_offsets, off)
            # merge with the next block
            if i < len(self._free_offsets) and self._free_offsets[i] == off + n:
                n += self._free_sizes.pop(self._free_offsets.pop(i))
            # merge with the previous block
            if i > 0:
                prev = self._free_offsets[i - 1]
                if prev + self._free_sizes[prev] == off:
                    self._free_sizes[prev] += n
                    return
            self._free_offsets.insert(i, off)
            self._free_sizes[off] = n


_heap = None
_heap_lock = threading.Lock()


def heap():
    """This process's foreign heap (created on first use)."""
    global _heap
    if _heap is None:
        with _heap_lock:
            if _heap is None:
                size = int(os.environ.get("FFIGUARD_HEAP_SIZE", DEFAULT_SIZE))
                _heap = ForeignHeap(size)
    return _heap


def _after_fork_in_child():
    """A forked child must not allocate from its parent's heap (both would hand out the
    same addresses, aliased across the processes): it gets its own on first use."""
    global _heap, _heap_lock
    _heap_lock = threading.Lock()
    h = _heap
    _heap = None
    if h is not None:
        h._orphan()


def in_foreign_heap(address, n=1):
    """True if [address, address + n) lies in the foreign heap."""
    h = _heap
    return h is not None and h.contains(address, n)


_types = {}


def _placed(ctype):
    """A subclass of ctype whose instances can carry a finalizer (weakref)."""
    t = _types.get(ctype)
    if t is None:  # (two threads may both make one: setdefault keeps a single one)
        made = type(ctype.__name__, (ctype,), {"__module__": ctype.__module__})
        t = _types.setdefault(ctype, made)
    return t


def foreign_new(ctype):
    """A zero-filled instance of ctype (a Structure, an array type, c_int, ...) placed in
    the foreign heap: passed to an isolated function (by pointer, byref() or as an
    array) it is not copied, the helper works on the same memory.  Freed when the
    object is garbage collected."""
    h = heap()
    size = ctypes.sizeof(ctype)
    address, n = h.alloc(size)
    ctypes.memset(address, 0, size)
    obj = _placed(ctype).from_address(address)
    weakref.finalize(obj, h.free, address, n)
    return obj


def foreign_buffer(init_or_size, size=None):
    """Like ctypes.create_string_buffer, but in the foreign heap (zero-copy when passed
    to isolated functions): foreign_buffer(n) or foreign_buffer(b"bytes"[, size])."""
    if isinstance(init_or_size, int):
        buf = foreign_new(ctypes.c_char * init_or_size)
        return buf
    if isinstance(init_or_size, bytes):
        if size is None:
            size = len(init_or_size) + 1
        buf = foreign_new(ctypes.c_char * size)
        buf.raw = init_or_size[:size] + bytes(max(0, size - len(init_or_size)))
        return buf
    raise TypeError("foreign_buffer() takes an int or bytes, not %s" % type(init_or_size).__name__)
