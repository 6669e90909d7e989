"""isolate mode against an untrusted helper, fork, abandoned calls, restarts, limits and
threads without the GIL (issue 12 items 14-17, issue 14's isolate part)."""
import ctypes
import os
import signal
import struct
import sys
import sysconfig
import threading
import time

import pytest

import ffiguard
from conftest import CRASHERS_PATH, UNDER_QEMU, setup_signatures
from ffiguard import _isolate
from ffiguard.isolate import (
    ForeignTimeout, HelperDied, HelperProtocolError, IsolatedCDLL, foreign_buffer, helper_pid,
    helper_restarts, in_foreign_heap, restart_helper, stop_helper,
)
from ffiguard.isolate import _wire as W

LIBC = "libc.so.6"
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def ctl_mappings(pid="self"):
    """Start addresses of this process's mappings of helper control regions."""
    with open("/proc/%s/maps" % pid) as f:
        return [int(line.split("-", 1)[0], 16) for line in f if "ffiguard-ctl" in line]


def inflight():
    return _isolate.counters()["inflight"]


# ---------------------------------------------------------------- item 14: the state word


def scribbling_libc(**kw):
    lib = IsolatedCDLL(LIBC, **kw)
    lib.usleep.argtypes = [ctypes.c_uint]
    lib.usleep.restype = ctypes.c_int
    lib.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.memcpy.restype = ctypes.c_void_p
    return lib


@pytest.mark.parametrize("path", ["fast", "general"])
@pytest.mark.parametrize("value", [0xFFFFFFFD, 0xFFFFFF9C, 0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 5])
def test_state_word_that_is_no_state_kills_the_helper(value, path):
    """Foreign code in the helper writes `value` into the state word of a call the host
    waits on (what a library scribbling over memory would do): the host raises
    HelperProtocolError at once and kills the helper; it neither loops (0xFFFFFFFD was
    'interrupted'), nor raises SystemError (0xFFFFFF9C was 'exception set'), nor
    reports a timeout or death that did not happen (0xFFFFFFFF, 0xFFFFFFFE)."""
    lib = scribbling_libc(timeout=20)
    try:
        # Both functions registered first: the slot watched below is the call's, not
        # a registration's.
        scratch = foreign_buffer(8)
        lib.memcpy(ctypes.addressof(scratch), b"1234", 4)
        if path == "fast":
            assert lib.usleep(0) == 0 and lib.usleep._fast_bound
            arg = 10_000_000
        else:
            assert lib.usleep(ctypes.c_uint(0)) == 0
            arg = ctypes.c_uint(10_000_000)  # a ctypes instance: the Python path
        helper = lib._helper
        pid = helper.pid
        (ctl_in_helper,) = ctl_mappings(pid)
        box = []

        def call():
            try:
                box.append(lib.usleep(arg))
            except BaseException as exc:  # noqa: B902 - checked below
                box.append(exc)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        end = time.monotonic() + 10
        waiting = []
        while not waiting and time.monotonic() < end:
            waiting = [s for s in helper.slots if W.U32.unpack_from(s.mem, s.base)[0] == W.CALL
                       and not W.U32.unpack_from(s.mem, s.base + W.OFF_OP)[0] & W.ADMIN]
        assert len(waiting) == 1
        slot = waiting[0]
        # The helper's own code writes into its mapping of the slot.  The waiting call
        # may see it and kill the helper before this call's reply is read: then this
        # one ends with the helper's death (SIGKILL).
        try:
            lib.memcpy(ctl_in_helper + slot.base, struct.pack("=I", value), 4)
        except HelperDied as exc:
            assert exc.signal == signal.SIGKILL and type(exc) is HelperDied
        t.join(10)
        assert not t.is_alive(), "the host ignores a bogus state word"
        (exc,) = box
        assert type(exc) is HelperProtocolError, repr(exc)
        assert exc.pid == pid and exc.function == "usleep"
        if value > W.CB_RET:
            assert "0x%08x, which is no slot state" % value in str(exc)
        else:
            assert "state %d out of turn" % value in str(exc)
        assert helper.dead and helper.returncode == -signal.SIGKILL
        assert lib.usleep(0) == 0 and helper_pid(lib) != pid  # a fresh helper
    finally:
        stop_helper(lib)


# ---------------------------------------------------------------- item 15: fork


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_gets_a_heap_of_its_own():
    """Parent and child allocate after the fork: their buffers must not alias."""
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH))
    try:
        before = foreign_buffer(64)  # made before the fork: stays shared
        assert lib.ffg_fill((ctypes.c_int * 16).from_buffer(before), 1) == 1
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                mine = foreign_buffer(64)
                mine.raw = b"C" * 64
                ints = (ctypes.c_int * 4).from_buffer(mine)
                lib.ffg_fill(ints, 7)  # through the child's own helper, zero-copy
                os.write(w, struct.pack("=QQ?", ctypes.addressof(mine), ints[0],
                                        in_foreign_heap(ctypes.addressof(before))))
                os.read(go_r, 1)
            finally:
                os._exit(0)
        os.close(w)
        os.close(go_r)
        ours = foreign_buffer(64)
        ours.raw = b"P" * 64
        theirs, filled, before_known = struct.unpack("=QQ?", os.read(r, 17))
        assert filled == 7
        assert not in_foreign_heap(theirs), "the child allocated from the parent's heap"
        assert not before_known  # the child's heap does not contain the parent's buffers
        assert ours.raw == b"P" * 64
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(go_w)
        assert ours.raw == b"P" * 64
        assert lib.ffg_fill((ctypes.c_int * 16).from_buffer(ours), 3) == 1
        assert (ctypes.c_int * 1).from_buffer(ours)[0] == 3
    finally:
        stop_helper(lib)


# ---------------------------------------------------------------- item 16: in flight


def test_call_abandoned_in_a_callback_is_not_left_in_flight():
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH))
    try:
        assert lib.ffg_add(1, 2) == 3
        assert inflight() == 0

        def interrupted(v):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            lib.ffg_call_callback(interrupted, 1)
        assert inflight() == 0
        assert lib.ffg_call_callback(lambda v: v * 2, 4) == 9 and inflight() == 0
        assert lib.ffg_add(2, 3) == 5 and inflight() == 0
    finally:
        stop_helper(lib)


def test_in_flight_count_after_faults_deaths_and_timeouts():
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH))
    libc = IsolatedCDLL(LIBC, timeout=0.2)
    libc.pause.argtypes = []
    try:
        with pytest.raises(ffiguard.SegmentationFault):
            lib.ffg_read_null()
        assert inflight() == 0
        with pytest.raises(ForeignTimeout):
            libc.pause()
        assert inflight() == 0
        assert lib.ffg_add(1, 1) == 2
        os.kill(helper_pid(lib), signal.SIGKILL)
        with pytest.raises(HelperDied):
            lib.ffg_add(1, 1)
        assert inflight() == 0
    finally:
        stop_helper(lib)
        stop_helper(libc)


# ---------------------------------------------------------------- item 17: restarts


def test_restarts_leave_no_control_region_mapped():
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH))
    libc = IsolatedCDLL(LIBC, timeout=0.1)
    libc.pause.argtypes = []
    start = len(ctl_mappings())
    try:
        for _ in range(20):
            restart_helper(lib)
            assert lib.ffg_add(1, 2) == 3
        for _ in range(5):  # a trapped fault retires the helper
            with pytest.raises(ffiguard.SegmentationFault):
                lib.ffg_read_null()
            assert lib.ffg_add(1, 2) == 3
        for _ in range(3):  # a timeout kills it
            with pytest.raises(ForeignTimeout):
                libc.pause()
        assert libc.abs(-3) == 3
        os.kill(helper_pid(lib), signal.SIGKILL)
        with pytest.raises(HelperDied):
            lib.ffg_add(1, 1)
        assert lib.ffg_add(1, 2) == 3
        assert helper_restarts(lib) == 26
        assert len(ctl_mappings()) == start, "control regions of dead helpers stay mapped"
    finally:
        stop_helper(lib)
        stop_helper(libc)
    assert len(ctl_mappings()) == start - 2


# ---------------------------------------------------------------- limits


def test_limits_count_from_after_start():
    """A data limit below what the helper itself uses at start-up (Python, the slot
    threads' stacks; about 1 GiB for a free-threaded interpreter) still starts it: the
    limit is what the foreign code may allocate on top."""
    lib = IsolatedCDLL(LIBC, limits={"data": 16 << 20})
    try:
        lib.malloc.argtypes = [ctypes.c_size_t]
        lib.malloc.restype = ctypes.c_void_p
        lib.free.argtypes = [ctypes.c_void_p]
        lib.free.restype = None
        p = lib.malloc(4 << 20)
        assert p
        lib.free(p)
        if not UNDER_QEMU:  # (qemu-user applies no RLIMIT_DATA, see test_limits_set_in_helper)
            assert lib.malloc(64 << 20) is None
    finally:
        stop_helper(lib)


# ---------------------------------------------------------------- free-threading


@pytest.mark.skipif(not FREE_THREADED, reason="only a free-threaded build has a GIL to keep off")
def test_extension_declares_free_threading(run_python):
    path = _isolate.__file__
    rc, out, err = run_python("""
    import importlib.machinery, importlib.util
    loader = importlib.machinery.ExtensionFileLoader("ffiguard._isolate", %r)
    spec = importlib.util.spec_from_file_location("ffiguard._isolate", %r, loader=loader)
    m = importlib.util.module_from_spec(spec)
    loader.exec_module(m)
    print(sys._is_gil_enabled())
    """ % (path, path))
    assert rc == 0 and out.split() == ["False"], err


def test_threads_share_one_library_with_faults_and_restarts():
    """Several threads on one isolated library at once: fast and general calls, fresh
    function objects, zero-copy buffers, faults (each retires the helper) and restarts.
    Every call gives its exact result or, while a restart kills the helper under it,
    HelperDied; afterwards every slot is back, nothing is in flight, no region leaks.
    (Run under PYTHON_GIL=0 on a free-threaded build: docs/isolate.md.)"""
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH, slots=3))
    start = len(ctl_mappings())
    nthreads, rounds = 4, 120
    errors, died = [], []
    barrier = threading.Barrier(nthreads)

    def work(k):
        try:
            out = ctypes.c_int()
            fbuf = foreign_buffer(16)
            ints = (ctypes.c_int * 4).from_buffer(fbuf)
            barrier.wait()
            for i in range(rounds):
                op = (i + k) % 8
                try:
                    if op < 3:
                        assert lib.ffg_add(i, k) == i + k
                    elif op == 3:
                        add = lib["ffg_add"]  # a new function object: binds on first call
                        add.argtypes = [ctypes.c_int, ctypes.c_int]
                        assert add(i, -k) == i - k and add(k, k) == 2 * k
                    elif op == 4:
                        assert lib.ffg_fill(ctypes.byref(out), i * 10 + k) == 1
                        assert out.value == i * 10 + k
                    elif op == 5:
                        assert lib.ffg_fill(ints, k) == 1 and ints[0] == k
                    elif op == 6 and i % 40 == k * 10:
                        with pytest.raises(ffiguard.SegmentationFault):
                            lib.ffg_read_null()
                    elif op == 7 and k == 0 and i % 30 == 7:
                        restart_helper(lib)
                    else:
                        assert lib.ffg_call_callback(lambda v: v + k, i) == i + k + 1
                except HelperDied as exc:  # a restart killed the helper under this call
                    died.append(exc)
        except BaseException as exc:  # noqa: B902 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
        assert all(e.signal == signal.SIGKILL for e in died), died
        assert lib.ffg_add(40, 2) == 42
        assert lib._helper.nfree == lib._helper.nslots and inflight() == 0
        assert len(ctl_mappings()) == start
    finally:
        stop_helper(lib)


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")
def test_many_threads_racing_for_few_slots():
    """More threads than slots on the fast path: each call gets a slot of its own (a
    slot handed out twice would mix two calls' arguments and results: the code before
    the C pool gave wrong sums in about one run in four of these 24,000 calls under
    PYTHON_GIL=0 on 3.13t)."""
    lib = setup_signatures(IsolatedCDLL(CRASHERS_PATH, slots=2))
    errors = []

    def work(k):
        try:
            for i in range(3000):
                a, b = (i * 7919 + k) % 100000, k * 1000003 % 100000
                assert lib.ffg_add(a, b) == a + b
        except BaseException as exc:  # noqa: B902 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        assert lib._helper.nfree == 2 and inflight() == 0
    finally:
        stop_helper(lib)
