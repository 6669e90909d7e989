"""The host side of isolate mode: IsolatedCDLL, IsolatedFunction and the helper process.

A call: take a free call slot of the library's helper, pack the arguments into it
(numbers in place; buffers copied into the slot, or into the foreign heap when large,
or not copied at all when they already live in the foreign heap), move the slot to
CALL and wait (ffiguard._isolate.exchange: spin briefly, then futex) for REPLY or a
callback request; then copy buffers back, decode the result, release the slot.
"""
import ctypes
import itertools
import json
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref

from .. import _isolate
from ..faults import ForeignFault
from . import _wire as W
from . import heap as _heapmod
from .errors import (ForeignTimeout, HelperDied, HelperProtocolError, HelperUnavailable,
                     StaleHandle, died)
from .heap import heap as _get_heap

__all__ = ["IsolatedCDLL", "IsolatedFunction", "Handle", "configure_spinning", "restart_helper",
           "stop_helper", "helper_pid", "helper_restarts"]

_SimpleCData = W._SimpleCData
_Pointer = W._Pointer
_CArgObject = type(ctypes.byref(ctypes.c_int()))
_generations = itertools.count(1)
_generations_lock = threading.Lock()  # (next() of a count is not atomic without the GIL)


def _next_generation():
    with _generations_lock:
        return next(_generations)

# ---- spinning policy ----------------------------------------------------------------


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_spinning(host_spin_us=None, helper_spin_us=None):
    """How long the host waits spinning for a reply (default 50 µs) and a helper for
    the next request (default 100 µs) before sleeping on the futex.  With fewer than
    two CPUs in this process's affinity mask nobody spins (a spinner would only steal
    the peer's CPU); otherwise at most (CPUs - 1) threads of a process spin at once.
    Affects helpers started afterwards."""
    global _HOST_SPIN_NS, _HELPER_SPIN_NS, _SPIN_LIMIT
    ncpu = _cpus()
    _SPIN_LIMIT = max(0, ncpu - 1)
    if host_spin_us is not None:
        _HOST_SPIN_NS = int(host_spin_us * 1000)
    if helper_spin_us is not None:
        _HELPER_SPIN_NS = int(helper_spin_us * 1000)
    _SPIN_LIMIT = min(_SPIN_LIMIT, _isolate.MAX_LEASES)
    _apply_spinning()


def _apply_spinning():
    h = _heapmod._heap  # the spin leases live in the foreign heap's first page
    _isolate.configure(0, _HOST_SPIN_NS if _SPIN_LIMIT else 0, _SPIN_LIMIT, 5000000,
                       h.base if h is not None else 0)


_HOST_SPIN_NS, _HELPER_SPIN_NS, _SPIN_LIMIT = 50000, 100000, 0
configure_spinning()

# ---- starting helpers from one long-lived thread --------------------------------------
# PR_SET_PDEATHSIG fires when the *thread* that forked the helper exits, so helpers
# are started from a daemon thread that lives as long as the process.

_spawn_queue = None
_spawn_lock = threading.Lock()


def _spawner():
    while True:
        fn, box, done = _spawn_queue.get()
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: B902 - handed to the caller
            box.append((False, exc))
        done.set()


def _in_spawner(fn):
    global _spawn_queue
    with _spawn_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(target=_spawner, name="ffiguard-isolate-spawner", daemon=True).start()
    box, done = [], threading.Event()
    _spawn_queue.put((fn, box, done))
    done.wait()
    ok, value = box[0]
    if not ok:
        raise value
    return value


_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = ("import sys; sys.path.insert(0, %r); import faulthandler; faulthandler.enable(); "
         "from ffiguard.isolate._helper import main; main()" % _PKG_PARENT)


class Handle(int):
    """A pointer returned by an isolated function: an address valid only in the helper
    process that returned it.  Pass it back to functions of the same library; after a
    helper restart passing it raises StaleHandle."""

    def __repr__(self):
        return "Handle(0x%x, helper %d)" % (int(self), self.generation)


# ---- one helper process --------------------------------------------------------------


# A call slot (index, addr, base, payload, mem, limit, cb_off): a C type, so that the
# fast path (IsolatedFunction's C base) reads its address directly.
_Slot = _isolate.Slot


class _Helper(_isolate.HelperBase):
    """One helper process, its control region and call slots.  dead, retired, pid and
    the slot pool live in the C base, where the fast path reads them; the pool unmaps
    the control region once the helper is dead and every slot is back."""

    # Slots, not a __dict__: on 3.11 attribute access to a dict of a subclass of a C
    # type is not specialized (4x slower than a slot), and the call path reads these.
    __slots__ = ("generation", "name", "nslots", "slot_size", "ctl_size", "fids", "lock", "cond",
                 "life", "returncode", "ctl", "mem", "slots", "popen", "sock", "__dict__",
                 "__weakref__")

    def __init__(self, lib):
        self.generation = _next_generation()
        self.name = lib._name
        self.nslots, self.slot_size = lib._slots, lib._slot_size
        self.ctl_size = W.CONTROL_HEAD + self.nslots * self.slot_size
        self.fids = {}
        self.returncode = None
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # threads waiting for a free slot
        self.life = threading.RLock()  # kill, reap, close
        self.popen = None
        self.sock = None
        heap = _get_heap()
        _apply_spinning()
        ctl_fd = os.memfd_create("ffiguard-ctl", os.MFD_CLOEXEC)
        host_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.ftruncate(ctl_fd, self.ctl_size)
            self.ctl = _isolate.map_shared(ctl_fd, self.ctl_size)
            self._set_region(self.ctl, self.ctl_size)
            mem = memoryview((ctypes.c_char * self.ctl_size).from_address(self.ctl)).cast("B")
            W.U32.pack_into(mem, 0, W.MAGIC)
            self.mem = mem
            self.slots = []
            for i in range(self.nslots):
                s = _Slot()
                s.index = i
                s.base = W.CONTROL_HEAD + i * self.slot_size
                s.addr = self.ctl + s.base
                s.payload = s.addr + W.SLOT_HEAD
                s.mem = mem
                s.limit = self.slot_size - W.SLOT_HEAD - W.CB_AREA
                s.cb_off = s.base + self.slot_size - W.CB_AREA
                self.slots.append(s)
            argv = [sys.executable, "-S", "-c", _BOOT, str(child_sock.fileno()),
                    str(os.getpid()), str(ctl_fd)]
            pass_fds = (child_sock.fileno(), ctl_fd, heap.fd)
            self.popen = _in_spawner(lambda: subprocess.Popen(
                argv, pass_fds=pass_fds, close_fds=True, stdin=subprocess.DEVNULL,
                start_new_session=True))
            self.pid = self.popen.pid
            self._set_slots(self.slots, self.pid)
        finally:
            os.close(ctl_fd)
            child_sock.close()
        self.sock = host_sock
        cfg = {
            "name": lib._name, "dlopen_mode": lib._dlopen_mode, "use_errno": lib._use_errno,
            "limits": lib._limits, "slots": self.nslots, "slot_size": self.slot_size,
            "heap_fd": heap.fd, "heap_base": heap.base, "heap_size": heap.size,
            "helper_spin_ns": 0 if lib._limits and "cpu" in lib._limits else
            (_HELPER_SPIN_NS if _SPIN_LIMIT else 0),
            "spin_limit": _SPIN_LIMIT,
        }
        try:
            host_sock.settimeout(60)
            host_sock.send(pickle.dumps(cfg))
            data = host_sock.recv(1 << 20)
        except OSError as exc:
            self.kill()
            raise OSError("ffiguard isolate: the helper for %s did not start: %s" % (self.name, exc))
        if not data:
            self.kill()
            raise OSError("ffiguard isolate: the helper for %s exited at start (status %s)"
                          % (self.name, self.returncode))
        try:
            what, value = json.loads(data)
            if what != "ready":
                raise W.exception_from_json(value)
        except BaseException:
            self.kill()
            raise
        host_sock.settimeout(None)

    # slots

    def acquire(self):
        """A free slot (waiting for one if need be), or None once the helper is dead or
        retired (it takes no new calls)."""
        slot = self._take()
        if slot is not None:
            return slot
        with self.cond:
            self._waiting(1)
            try:
                while True:
                    slot = self._take()
                    if slot is not None or self.dead or self.retired:
                        return slot
                    self.cond.wait(0.05)
            finally:
                self._waiting(-1)

    def release(self, slot):
        flags = self._give(slot)
        if flags:
            self._wake(flags)

    def _wake(self, flags):
        """A slot came back (the C fast path calls this too) and someone waits for one
        (flags & 1) or the helper is retired (flags & 2): close it once all are back."""
        if flags & 1:
            with self.cond:
                self.cond.notify()
        if flags & 2 and self.nfree == self.nslots:
            self.close()

    # lifetime: each ends with _maybe_unmap (the region goes when every slot is back)

    def kill(self):
        """SIGKILL the helper and reap it; returns its Popen returncode."""
        with self.life:
            self._set_dead()
            if self.returncode is None and self.popen is not None:
                try:
                    self.popen.kill()
                except OSError:
                    pass
                self.reap()
        self._maybe_unmap()
        return self.returncode

    def reap(self, timeout=5):
        with self.life:
            if self.returncode is None and self.popen is not None:
                try:
                    self.returncode = self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.returncode = self.popen.wait()
                except ChildProcessError:  # someone else reaped it
                    self.returncode = self.popen.returncode
            self._set_dead()
            if self.sock is not None:
                try:
                    self.sock.close()
                except OSError:
                    pass
        self._maybe_unmap()
        return self.returncode

    def close(self):
        with self.life:
            if not self.dead:
                self._set_dead()
                if self.sock is not None:
                    self.sock.close()  # the helper sees EOF and exits
                try:
                    self.returncode = self.popen.wait(1)
                except subprocess.TimeoutExpired:
                    self.kill()
        self._maybe_unmap()

    # admin round trips (slow path)

    def admin(self, code, request, function=None, deadline=0):
        slot = self.acquire()
        if slot is None:
            raise _HelperGone("the helper of %s is gone" % self.name)
        try:
            data = pickle.dumps(request)
            if len(data) > slot.limit // 2:
                raise ValueError("request too large")
            mem = slot.mem
            mem[slot.base + W.SLOT_HEAD:slot.base + W.SLOT_HEAD + len(data)] = data
            W.U32.pack_into(mem, slot.base + W.OFF_OP, W.ADMIN | code)
            W.U32.pack_into(mem, slot.base + W.OFF_REQ_LEN, len(data))
            st = _isolate.exchange(slot, W.CALL, W.CALL, deadline, self.pid)
            if st != W.REPLY:
                raise _lost(self, st, function, None, slot=slot)
            status, rep_len = _HEAD2.unpack_from(mem, slot.base + W.OFF_STATUS)
            off = slot.base + W.SLOT_HEAD + W.align(len(data))
            if rep_len > slot.limit:
                raise _lost(self, _isolate.PROTOCOL, function, None, "reply length out of bounds")
            value = json.loads(bytes(mem[off:off + rep_len]))
            if status != W.OK:
                raise W.exception_from_json(value)
            return value
        finally:
            self.release(slot)


class _HelperGone(HelperUnavailable):
    """The helper was closed or retired before the call could take one of its slots
    (another thread's fault retired it): under restart="always" the call goes to the
    next helper."""


_RETRIES = 8  # helpers a call tries when each is gone before it gets a slot


def _lost(helper, st, function, timeout, why=None, slot=None):
    """The exception when a call did not get a reply: a timeout, the helper's death, or
    a protocol violation (PROTOCOL: the state word holds no state; a state out of turn;
    or `why`).  The helper is killed (if still alive) and reaped."""
    if st == _isolate.TIMEOUT:
        helper.kill()
        return ForeignTimeout(
            "call to %s in isolated %s timed out after %gs; the helper (pid %d) was killed"
            % (function, helper.name, timeout, helper.pid),
            timeout=timeout, pid=helper.pid, function=function, signal=None)
    if st == _isolate.DEAD:
        rc = helper.reap()
        return died(rc, helper.pid, function, helper.name)
    # The helper wrote something the protocol does not allow into shared memory: it is
    # not trusted any further.
    if why is None:
        if st == _isolate.PROTOCOL:
            raw = W.U32.unpack_from(slot.mem, slot.base)[0] if slot is not None else None
            why = ("the state word holds 0x%08x, which is no slot state" % raw
                   if raw is not None else "the state word holds no slot state")
        else:
            why = "state %d out of turn" % st
    helper.kill()
    return HelperProtocolError(
        "the helper process (pid %d) of %s broke the call protocol (%s)%s; it was killed"
        % (helper.pid, helper.name, why, " during call to %s" % function if function else ""),
        signal=None, exit_code=None, pid=helper.pid, function=function, code=None,
        code_name=None, address=None, pc=None, library=None, symbol=None, frames=[],
        registers={}, access=None, sp=None)


# ---- libraries and functions -----------------------------------------------------------


class IsolatedCDLL:
    """A shared library loaded in a helper process; its functions look like ctypes
    functions (argtypes, restype, errcheck) and run there.

    timeout: seconds per call (None: no limit); a function's own ``timeout``
        attribute overrides it.  A call that takes longer raises ForeignTimeout and
        the helper is killed.
    restart: "always" (default): after the helper died, timed out, or trapped a fault
        (its state is suspect), the next call starts a fresh helper (library state is
        lost: handles from before raise StaleHandle).  "never": a trapped fault keeps
        the helper; after its death calls raise HelperUnavailable until restart().
    limits: {"address_space": bytes, "data": bytes, "cpu": seconds} for the helper
        (RLIMIT_AS, RLIMIT_DATA, RLIMIT_CPU).
    slots: concurrent calls (each a helper thread), default 4.
    slot_size: bytes per slot; larger buffer arguments go through the foreign heap.
    """

    def __init__(self, name, timeout=None, restart="always", limits=None, slots=4,
                 slot_size=64 << 10, use_errno=False, dlopen_mode=ctypes.DEFAULT_MODE):
        if restart not in ("always", "never"):
            raise ValueError('restart must be "always" or "never", not %r' % (restart,))
        if limits:
            bad = set(limits) - {"address_space", "data", "cpu"}
            if bad:
                raise ValueError("unknown limits %s (known: address_space, data, cpu)"
                                 % ", ".join(sorted(bad)))
        if slots < 1 or slot_size < 2 * W.CB_AREA + W.SLOT_HEAD:
            raise ValueError("slots must be >= 1 and slot_size >= %d" % (2 * W.CB_AREA + W.SLOT_HEAD))
        self._name = name if name is None else os.fspath(name)
        self._timeout = timeout
        self._restart = restart
        self._limits = dict(limits) if limits else None
        self._slots = int(slots)
        self._slot_size = (int(slot_size) + 4095) & ~4095
        self._use_errno = bool(use_errno)
        self._dlopen_mode = dlopen_mode
        self._lock = threading.Lock()
        self._helper = None
        self._restarts = 0
        self._box = [None]
        self._start()
        self._finalizer = weakref.finalize(self, _close_helper, self._box)
        _libraries.add(self)

    # the helper

    def _start(self):
        helper = _Helper(self)
        self._box[0] = helper
        self._helper = helper
        return helper

    def _live_helper(self):
        h = self._helper
        if h is not None and not h.dead and not h.retired:
            return h
        with self._lock:
            h = self._helper
            if h is not None and not h.dead and not h.retired:
                return h
            if self._restart == "never" and h is not None:
                raise HelperUnavailable(
                    "the helper of %s is gone (restart='never'); call "
                    "ffiguard.isolate.restart_helper(lib)" % self._name)
            self._restarts += 1
            return self._start()

    def _retire(self, helper):
        """A trapped fault made this helper suspect: no new calls go to it, and it is
        stopped once the calls in progress on it are done."""
        if self._restart != "always":
            return
        if helper._set_retired():  # every slot is free: nothing runs on it any more
            helper.close()

    # No public methods or properties: every public name is looked up as a function of
    # the library (close, restart, timeout... are common C names).  Use the module
    # functions restart_helper(lib), stop_helper(lib), helper_pid(lib).

    def _restart_helper(self):
        with self._lock:
            if self._helper is not None:
                self._helper.kill()
            self._restarts += 1
            self._start()

    def _stop_helper(self):
        h = self._helper
        if h is not None:
            h.close()

    def _helper_pid(self):
        h = self._helper
        return None if h is None or h.dead else h.pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop_helper()

    def __repr__(self):
        return "<ffiguard.isolate.IsolatedCDLL %r, helper pid %s>" % (self._name, self._helper_pid())

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        fn = self[name]
        setattr(self, name, fn)
        return fn

    def __getitem__(self, name):
        if not isinstance(name, str):
            raise TypeError("isolate mode looks functions up by name only")
        for retry in range(_RETRIES):
            try:
                _, address = self._live_helper().admin(W.ADMIN_REGISTER, (name, None, None), name)
                return IsolatedFunction(self, name, address)
            except _HelperGone:  # retired by another thread's fault meanwhile
                if self._restart != "always" or retry == _RETRIES - 1:
                    raise


def restart_helper(lib):
    """Stop the helper of IsolatedCDLL `lib` (if any) and start a fresh one (library
    state is lost; handles from before become stale)."""
    lib._restart_helper()


def stop_helper(lib):
    """Stop the helper process of `lib`.  Under restart="always" the next call starts a
    new one; under restart="never" calls raise HelperUnavailable until restart_helper()."""
    lib._stop_helper()


def helper_pid(lib):
    """Process id of the running helper of `lib`, or None."""
    return lib._helper_pid()


def helper_restarts(lib):
    """How many helpers `lib` started after its first one."""
    return lib._restarts


_libraries = weakref.WeakSet()


def _after_fork_in_child():
    """A forked child must not share its parent's helpers (nor their call slots): it
    forgets them (without killing them: they are the parent's) and starts its own on
    its first call."""
    global _spawn_queue, _spawn_lock, _generations_lock
    _spawn_queue = None
    _spawn_lock = threading.Lock()  # (held by another thread at fork: never released here)
    _generations_lock = threading.Lock()
    # The foreign heap is the parent's: this process gets a heap of its own on first use
    # (buffers made before the fork stay shared with the parent).
    _heapmod._after_fork_in_child()
    _apply_spinning()
    for lib in list(_libraries):
        h = lib._helper
        if h is not None:
            h._set_dead()
            h.returncode = None
            try:
                h.sock.close()  # our copy only: the parent's helper must still see its EOF
            except OSError:
                pass
            h._maybe_unmap()  # (this copy of the parent's control region)
            lib._box[0] = None
            lib._helper = None
        lib._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_helper(box):
    h = box[0]
    if h is not None:
        try:
            h.close()
        except Exception:
            pass


class _Plan:
    __slots__ = ("key", "specs", "argst", "fast", "encoders", "res", "resst", "restype",
                 "fixed", "callbacks", "fastdesc")


class IsolatedFunction(_isolate.FunctionBase):
    """A function of an IsolatedCDLL: set argtypes, restype, errcheck, timeout as on a
    ctypes function; calling it runs it in the helper.

    Calling goes to the C base first (ffiguard._isolate.FunctionBase): once a call with
    numbers only (see _fast_desc) went through _call, the C base makes the next such
    calls itself, and hands everything else (other argument types, a dead or retired
    helper, no free slot, any failure) to _call and _fast_fail."""

    # Slots for what the Python path reads (see _Helper); __dict__ for anything else.
    __slots__ = ("_lib", "__name__", "_address", "_argtypes", "_restype", "_plans", "_plan",
                 "_bound", "__dict__", "__weakref__")

    def __init__(self, lib, name, address):
        self._lib = lib
        self.__name__ = name
        self._address = address
        self._argtypes = None
        self._restype = ctypes.c_int
        self.errcheck = None
        self.timeout = None  # None: the library's
        self._plans = {}
        self._plan = None
        self._bound = None

    @property
    def _as_parameter_(self):
        """The function's address in the helper: pass it as a function pointer argument."""
        return self._address

    @property
    def argtypes(self):
        return self._argtypes

    @argtypes.setter
    def argtypes(self, value):
        value = tuple(value) if value is not None else None
        if value is not None:
            specs = tuple(W.spec_of(t, "argument type") for t in value)
            for t, s in zip(value, specs):
                if s[0] == "struct" and W.has_pointers(s):
                    raise TypeError(
                        "isolate mode cannot pass structure %s by value: it contains pointers "
                        "(only c_void_p fields, carried as raw numbers, are allowed)" % t.__name__)
        self._argtypes = value
        self._plans = {}
        self._plan = None
        self._bound = None
        self._unbind_fast()

    @property
    def restype(self):
        return self._restype

    @restype.setter
    def restype(self, value):
        if value is not None and not isinstance(value, type):
            raise TypeError("isolate mode needs a ctypes type (or None) as restype, not %r" % (value,))
        s = W.spec_of(value, "result type")
        if s is not None and s[0] == "array":
            raise TypeError("a C function cannot return an array")
        self._restype = value
        self._plans = {}
        self._plan = None
        self._bound = None
        self._unbind_fast()

    def __repr__(self):
        return "<ffiguard.isolate.IsolatedFunction %s of %r>" % (self.__name__, self._lib._name)

    # ---- planning: how each argument travels -------------------------------------------

    def _compile(self, args):
        argtypes = self._argtypes or ()
        if len(args) < len(argtypes):
            raise TypeError("this function takes at least %d argument%s (%d given)"
                            % (len(argtypes), "s" if len(argtypes) != 1 else "", len(args)))
        types = list(argtypes)
        for k in range(len(argtypes), len(args)):
            types.append(_infer(args[k], k))
        key = tuple(types)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = _Plan()
        specs = tuple(W.spec_of(t, "argument type") for t in types)
        plan.specs = specs
        plan.key = (self.__name__, specs, W.spec_of(self._restype, "result type"))
        plan.argst = struct.Struct("@" + "".join(W.wire_code(s) for s in specs))
        plan.fixed = W.align(plan.argst.size)
        plan.encoders = [_encoder(t, s, k) for k, (t, s) in enumerate(zip(types, specs))]
        plan.fast = all(s[0] == "s" and s[1] in W.SCALAR_CODES for s in specs)
        plan.callbacks = [k for k, s in enumerate(specs) if s[0] == "cfunc"]
        plan.restype = self._restype
        plan.res = W.spec_of(self._restype, "result type")
        r = plan.res
        plan.resst = struct.Struct("@" + r[1]) if r and r[0] == "s" and r[1] in W.SCALAR_CODES else None
        plan.fastdesc = W.fast_desc(specs, r, inferred=self._argtypes is None)
        self._plans[key] = plan
        if self._argtypes is not None and len(args) == len(argtypes):
            self._plan = plan
        return plan

    # ---- the call ----------------------------------------------------------------------

    def _call(self, *args):
        """The Python path (FunctionBase's tp_call comes here for anything but a plain
        success of the fast path)."""
        plan = self._plan
        if plan is None or len(args) != len(plan.specs):
            plan = self._compile(args)
        lib = self._lib
        retry = 0
        while True:
            helper = lib._helper
            if helper is None or helper.dead or helper.retired:
                helper = lib._live_helper()
            try:
                fid = helper.fids.get(plan.key)
                if fid is None:
                    fid = self._register(helper, plan)
            except _HelperGone:
                retry += 1
                if lib._restart != "always" or retry == _RETRIES:
                    raise
                continue
            if plan.fastdesc is not None and self._bound is not helper and not lib._use_errno and (
                    self._plan is plan or self._argtypes is None):
                # Number-only: from now on the C base makes such calls itself.  (Without
                # argtypes it binds the first arity seen; others keep taking this path.)
                self._bind_fast(helper, fid, plan.fastdesc, float(lib._timeout or 0))
                self._bound = helper
            timeout = self.timeout if self.timeout is not None else lib._timeout
            deadline = time.monotonic_ns() + int(timeout * 1e9) if timeout else 0
            slot = helper._take()  # (acquire() below when none is free: it waits)
            if slot is None:
                slot = helper.acquire()
            if slot is not None:
                break
            retry += 1
            if lib._restart != "always" or retry == _RETRIES:
                raise HelperUnavailable("the helper of %s is gone" % lib._name)
            # retired (another thread's fault) or closed since we looked: the next one
        ctx = None
        try:
            mem = slot.mem
            if plan.fast:
                try:
                    plan.argst.pack_into(mem, slot.base + W.SLOT_HEAD, *args)
                    req_len = plan.argst.size
                except (struct.error, TypeError):
                    ctx = _Ctx(slot, plan, helper)
                    req_len = ctx.encode(args)
            else:
                ctx = _Ctx(slot, plan, helper)
                req_len = ctx.encode(args)
            _HEAD3.pack_into(mem, slot.base + W.OFF_OP, fid, 0, req_len)
            if lib._use_errno:
                W.I32.pack_into(mem, slot.base + W.OFF_ERRNO, ctypes.get_errno())
            try:
                st = _isolate.exchange(slot, W.CALL, W.CALL, deadline, helper.pid)
                while st == W.CB_REQ:
                    self._callback(slot, plan, args, ctx)
                    st = _isolate.exchange(slot, W.CB_RET, W.CB_RET, deadline, helper.pid)
            except BaseException:  # Ctrl-C (or a failing callback machinery): the call is lost
                helper.kill()
                raise
            if st != W.REPLY:
                raise _lost(helper, st, self.__name__, timeout, slot=slot)
            status, rep_len = _HEAD2.unpack_from(mem, slot.base + W.OFF_STATUS)
            rep_off = slot.base + W.SLOT_HEAD + W.align(req_len)
            if rep_len > slot.limit:
                raise _lost(helper, _isolate.PROTOCOL, self.__name__, timeout,
                            "reply length out of bounds")
            if lib._use_errno:
                ctypes.set_errno(W.I32.unpack_from(mem, slot.base + W.OFF_ERRNO)[0])
            if ctx is not None:
                ctx.copy_back()
            if status != W.OK:
                exc = self._failure(helper, status, mem, rep_off, rep_len)
                raise exc
            if plan.resst is not None:
                result = plan.resst.unpack_from(mem, rep_off)[0]
            else:
                result = _decode_result(plan, mem, rep_off, rep_len, helper)
        finally:
            if ctx is not None:
                ctx.release()
            flags = helper._give(slot)  # (helper.release, inline)
            if flags:
                helper._wake(flags)
        if self.errcheck is not None:
            return self.errcheck(result, self, args)
        return result

    def _fast_fail(self, helper, slot, st, args, req_len):
        """The fast path's call did not simply succeed (state st; None: interrupted
        while waiting): raise what _call would have raised, and release the slot."""
        timeout = self.timeout if self.timeout is not None else self._lib._timeout
        try:
            if st is None:  # Ctrl-C: the call is lost (the C side re-raises it)
                helper.kill()
                return None
            if st == W.CB_REQ:
                k = W.U32.unpack_from(slot.mem, slot.base + W.OFF_OP)[0]
                raise _lost(helper, _isolate.PROTOCOL, self.__name__, None,
                            "callback request for argument %d of a function without one" % k)
            if st != W.REPLY:
                raise _lost(helper, st, self.__name__, timeout, slot=slot)
            mem = slot.mem
            status, rep_len = _HEAD2.unpack_from(mem, slot.base + W.OFF_STATUS)
            if rep_len > slot.limit:
                raise _lost(helper, _isolate.PROTOCOL, self.__name__, timeout,
                            "reply length out of bounds")
            if status == W.OK:
                return None  # the C side failed after a good reply; it raises its error
            raise self._failure(helper, status, mem, slot.base + W.SLOT_HEAD + W.align(req_len),
                                rep_len)
        finally:
            helper.release(slot)

    def _register(self, helper, plan):
        fid, _ = helper.admin(W.ADMIN_REGISTER, (self.__name__, plan.specs, plan.res), self.__name__)
        helper.fids[plan.key] = fid
        return fid

    def _failure(self, helper, status, mem, off, n):
        try:
            exc = W.exception_from_json(json.loads(bytes(mem[off:off + n])))
        except Exception as e:  # a helper that wrote garbage
            helper.kill()
            return died(helper.returncode, helper.pid, self.__name__, helper.name,
                        why="(unreadable reply: %s)" % e)
        if status == W.FAULT and isinstance(exc, ForeignFault):
            exc.helper_pid = helper.pid
            self._lib._retire(helper)
            return exc
        if isinstance(exc, BaseException):
            return exc
        return RuntimeError("isolated call failed: %r" % (exc,))

    def _callback(self, slot, plan, args, ctx):
        mem = slot.mem
        k = W.U32.unpack_from(mem, slot.base + W.OFF_OP)[0]
        if k >= len(plan.specs) or plan.specs[k][0] != "cfunc":
            raise _lost(ctx.helper if ctx else self._lib._helper, _isolate.PROTOCOL, self.__name__,
                        None, "callback request for argument %d, which is no callback" % k)
        spec = plan.specs[k]
        fn = args[k]
        rescode, argst, kinds = _callback_codes(spec)
        area = slot.cb_off
        values = list(argst.unpack_from(mem, area))
        for i, kind in enumerate(kinds):
            if kind == "z":
                v = values[i]
                if v == -1:
                    values[i] = None
                else:
                    off, n = v & 0xFFFFFFFF, v >> 32
                    if off + n > W.CB_AREA:
                        values[i] = None
                    else:
                        values[i] = bytes(mem[area + off:area + off + n])
            elif kind == "P" and values[i] == 0:
                values[i] = None
        try:
            result = fn(*values)
            if rescode is not None:
                if result is None:
                    result = 0
                struct.pack_into("@" + rescode, mem, area, result)
        except Exception:
            print("Exception ignored in an isolated callback %r:" % (fn,), file=sys.stderr)
            traceback.print_exc()
            if rescode is not None:
                struct.pack_into("@" + rescode, mem, area, 0)


_HEAD3 = struct.Struct("=III")
_HEAD2 = struct.Struct("=I4xI")  # status, (req_len), rep_len
_cb_codes = {}


def _callback_codes(spec):
    c = _cb_codes.get(spec)
    if c is None:
        res, args = spec[1], spec[2]
        kinds = [a[1] for a in args]
        argst = struct.Struct("@" + "".join("q" if k in "Pz" else k for k in kinds))
        rescode = None if res is None else ("q" if res[1] in "Pz" else res[1])
        c = _cb_codes[spec] = (rescode, argst, kinds)
    return c


def _infer(value, k):
    """The ctypes type ctypes itself would use for an argument without argtypes."""
    if isinstance(value, bool):
        return ctypes.c_int
    if isinstance(value, Handle):
        return ctypes.c_void_p
    if isinstance(value, int):
        return ctypes.c_int
    if isinstance(value, bytes) or value is None:
        return ctypes.c_char_p if value is not None else ctypes.c_void_p
    if isinstance(value, str):
        return ctypes.c_wchar_p
    if isinstance(value, (_SimpleCData, ctypes.Structure, ctypes.Union)):
        return type(value)  # passed by value, as ctypes does
    if isinstance(value, (ctypes.Array, _Pointer, _CArgObject)):
        return ctypes.c_void_p
    if isinstance(value, IsolatedFunction):
        return ctypes.c_void_p
    raise ctypes.ArgumentError("argument %d: %s: Don't know how to convert parameter %d"
                               % (k + 1, TypeError.__name__, k + 1))


# ---- marshalling ------------------------------------------------------------------------


def _scalar_value(t):
    def conv(a):
        if isinstance(a, _SimpleCData):
            a = a.value
        elif hasattr(a, "_as_parameter_") and not isinstance(a, (int, float)):
            return conv(a._as_parameter_)
        return t(a).value
    return conv


def _encoder(t, spec, k):
    kind = spec[0]
    if kind == "s" and spec[1] in W.SCALAR_CODES:
        return ("scalar", _scalar_value(t))
    if kind == "struct":
        return ("struct", t)
    if kind == "cfunc":
        return ("cfunc", t)
    return ("ptr", spec[1] if kind == "s" else kind)


class _Ctx:
    """Per call state of the general path: where copied buffers went."""

    __slots__ = ("slot", "plan", "helper", "cursor", "back", "temps", "limit")

    def __init__(self, slot, plan, helper):
        self.slot, self.plan, self.helper = slot, plan, helper
        self.cursor = plan.fixed
        self.back = []
        self.temps = []
        res = plan.res
        reserve = 256 + (res[5] if res and res[0] == "struct" else 0)
        self.limit = slot.limit - reserve

    def encode(self, args):
        plan = self.plan
        values = []
        for k, (a, (kind, extra)) in enumerate(zip(args, plan.encoders)):
            try:
                if kind == "scalar":
                    values.append(extra(a))
                elif kind == "ptr":
                    values.append(self.pointer(a, extra))
                elif kind == "struct":
                    if not isinstance(a, extra):
                        raise TypeError("expected %s instance instead of %s"
                                        % (extra.__name__, type(a).__name__))
                    values.append(bytes(a))
                else:  # cfunc
                    if a is None:
                        values.append(0)
                    elif isinstance(a, (Handle, IsolatedFunction)):
                        values.append(self.pointer(a, "P"))
                    elif callable(a):
                        values.append(-1)
                    else:
                        raise TypeError("a callback argument takes a Python callable, None, "
                                        "or a function of the same isolated library")
            except (TypeError, ValueError, OverflowError) as exc:
                if isinstance(exc, StaleHandle):
                    raise
                raise ctypes.ArgumentError("argument %d: %s: %s" % (k + 1, type(exc).__name__, exc))
        plan.argst.pack_into(self.slot.mem, self.slot.base + W.SLOT_HEAD, *values)
        return self.cursor

    def pointer(self, a, code):
        if a is None:
            return 0
        if isinstance(a, Handle):
            if a.generation != self.helper.generation:
                raise StaleHandle("handle 0x%x came from an earlier helper process of %s "
                                  "(restarted since): it is no longer valid" % (a, self.helper.name))
            return int(a)
        if isinstance(a, int):
            return a
        if isinstance(a, bytes):
            if code not in ("z", "P", "ptr", "array"):
                raise TypeError("bytes cannot be passed as %s" % code)
            return self.copy_in_bytes(a + b"\0")
        if isinstance(a, str):
            if code != "Z":
                raise TypeError("str is only accepted for c_wchar_p (use bytes)")
            return self.copy_in_bytes((a + "\0").encode("utf-32-le" if sys.byteorder == "little"
                                                        else "utf-32-be"))
        if isinstance(a, IsolatedFunction):
            return a._address
        if isinstance(a, _CArgObject):
            obj = a._obj
            addr = ctypes.cast(a, ctypes.c_void_p).value
            size = ctypes.addressof(obj) + ctypes.sizeof(obj) - addr
            return self.buffer(addr, max(size, 0), type(obj))
        if isinstance(a, _Pointer):
            addr = ctypes.cast(a, ctypes.c_void_p).value
            if not addr:
                return 0
            return self.buffer(addr, ctypes.sizeof(a._type_), a._type_)
        if isinstance(a, _SimpleCData) and code in ("P", "z", "Z"):
            return self.pointer(a.value, code)
        if isinstance(a, (ctypes.Array, ctypes.Structure, ctypes.Union, _SimpleCData)):
            return self.buffer(ctypes.addressof(a), ctypes.sizeof(a), type(a))
        if isinstance(a, ctypes._CFuncPtr):
            raise TypeError("a function pointer of the host process means nothing in the helper")
        if hasattr(a, "_as_parameter_"):
            return self.pointer(a._as_parameter_, code)
        raise TypeError("isolate mode cannot pass %s as a pointer" % type(a).__name__)

    def copy_in_bytes(self, data):
        n = len(data)
        if self.cursor + n <= self.limit:
            off = self.cursor
            self.slot.mem[self.slot.base + W.SLOT_HEAD + off:self.slot.base + W.SLOT_HEAD + off + n] = data
            self.cursor = W.align(off + n)
            return -(off + 1)
        addr, size = _get_heap().alloc(n)
        self.temps.append((addr, size))
        ctypes.memmove(addr, data, n)
        return addr

    def buffer(self, addr, n, ctype):
        h = _get_heap()
        if h.contains(addr, n):
            return addr  # zero-copy: same address in the helper
        if _has_pointer_fields(ctype):
            raise TypeError(
                "%s contains pointers, which would point into the host: isolate mode only "
                "copies pointer-free data (place it in the foreign heap with "
                "ffiguard.isolate.foreign_new() to share it as is)" % ctype.__name__)
        if self.cursor + n <= self.limit:
            off = self.cursor
            dst = self.slot.payload + off
            self.cursor = W.align(off + n)
            wire = -(off + 1)
        else:
            dst, size = h.alloc(n)
            self.temps.append((dst, size))
            wire = dst
        ctypes.memmove(dst, addr, n)
        self.back.append((addr, dst, n))
        return wire

    def copy_back(self):
        for addr, src, n in self.back:
            ctypes.memmove(addr, src, n)

    def release(self):
        if self.temps:
            h = _get_heap()
            for addr, size in self.temps:
                h.free(addr, size)
            self.temps = []


_ptr_fields_cache = {}


def _has_pointer_fields(t):
    r = _ptr_fields_cache.get(t)
    if r is None:
        try:
            spec = W.spec_of(t, "type")
            r = W.has_pointers(spec) if spec[0] in ("struct", "array") else False
        except TypeError:
            r = True
        _ptr_fields_cache[t] = r
    return r


def _decode_result(plan, mem, off, n, helper):
    res = plan.res
    if res is None:
        return None
    kind = res[0]
    if kind == "struct":
        return plan.restype.from_buffer_copy(bytes(mem[off:off + n]))
    if kind == "s" and res[1] in "zZ":
        length = W.Q.unpack_from(mem, off)[0]
        if length < 0:
            return None
        data = bytes(mem[off + 8:off + 8 + min(length, n - 8)])
        return data if res[1] == "z" else data.decode("utf-8", "surrogatepass")
    address = W.Q.unpack_from(mem, off)[0]
    if kind == "ptr":
        if not address:
            return plan.restype()
        if _get_heap().contains(address, 1):
            return ctypes.cast(address, plan.restype)
    elif not address:
        return None
    elif _get_heap().contains(address, 1):
        return address  # the foreign heap: the same address in the host
    h = Handle(address)
    h.generation = helper.generation
    return h


_isolate.set_hooks(IsolatedFunction._call, IsolatedFunction._fast_fail)
