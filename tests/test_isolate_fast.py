"""isolate mode's C fast path: calls whose arguments and result are plain numbers are
packed, exchanged and unpacked in C on the host, and run from C (through ffiguard's
trap) in the helper.  Each result must equal what ctypes gives in this process, and
everything unusual must still behave exactly as the Python path does."""
import ctypes
import os
import signal
import threading
import time

import pytest

import ffiguard
from conftest import CRASHERS_PATH, DIVISION_TRAPS, expected_access
from ffiguard import _isolate
from ffiguard.isolate import (
    ForeignTimeout, Handle, HelperDied, IsolatedCDLL, foreign_buffer, helper_pid, stop_helper,
)
from ffiguard.isolate import _wire as W
from ffiguard.isolate.host import IsolatedFunction

LIBC = "libc.so.6"
LIBM = "libm.so.6"
C = ctypes


@pytest.fixture(scope="module")
def libs():
    """isolated crashers, libc, libm, then the same three through plain ctypes"""
    isolated = [IsolatedCDLL(p) for p in (CRASHERS_PATH, LIBC, LIBM)]
    yield isolated + [ctypes.CDLL(p) for p in (CRASHERS_PATH, LIBC, LIBM)]
    for lib in isolated:
        stop_helper(lib)


@pytest.fixture
def slow_calls():
    """Names of the calls that went through the Python path (IsolatedFunction._call)."""
    calls = []

    def spy(self, *args, **kw):
        calls.append(self.__name__)
        return IsolatedFunction._call(self, *args, **kw)

    _isolate.set_hooks(spy, IsolatedFunction._fast_fail)
    try:
        yield calls
    finally:
        _isolate.set_hooks(IsolatedFunction._call, IsolatedFunction._fast_fail)


def declare(lib, name, argtypes, restype):
    fn = lib[name]  # a fresh function object each time
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


# (library index: 0 crashers, 1 libc, 2 libm), function, argtypes, restype, calls
CASES = [
    # c_int, with C's wrap-around done by the callee; sign extension of -1
    (0, "ffg_add", [C.c_int, C.c_int], C.c_int,
     [(1, 2), (-1, 0), (-5, 3), (2 ** 31 - 1, 1), (-2 ** 31, -1)]),
    (0, "ffg_add", [C.c_uint, C.c_uint], C.c_uint,
     [(0xFFFFFFFF, 0), (0xFFFFFFFF, 1), (0x80000000, 0), (0, 0)]),
    # small ints widened by the caller (libffi) per their C type, results narrowed
    (0, "ffg_add", [C.c_byte, C.c_int], C.c_int, [(-1, 0), (127, 1), (-128, -1)]),
    (0, "ffg_add", [C.c_ubyte, C.c_int], C.c_int, [(255, 0), (0, -1)]),
    (0, "ffg_add", [C.c_int, C.c_int], C.c_byte, [(127, 1), (-1, 0), (255, 0)]),
    (0, "ffg_add", [C.c_int, C.c_int], C.c_ubyte, [(-1, 0), (256, 1)]),
    (0, "ffg_add", [C.c_short, C.c_ushort], C.c_int, [(-1, 65535), (-32768, 0), (32767, 1)]),
    (0, "ffg_add", [C.c_int, C.c_int], C.c_short, [(32767, 1), (-1, 0)]),
    (0, "ffg_add", [C.c_int, C.c_int], C.c_ushort, [(-1, 0), (65535, 2)]),
    (0, "ffg_add", [C.c_bool, C.c_int], C.c_int, [(True, 5), (False, 5), (0, 1), (7, 1)]),
    (0, "ffg_add", [C.c_int, C.c_int], C.c_bool, [(0, 0), (1, 1), (-1, 0)]),
    # c_char: bytes of one byte; signed char on both architectures in ctypes
    (0, "ffg_add", [C.c_char, C.c_int], C.c_int, [(b"a", 0), (b"\xff", 0), (b"\x80", 1)]),
    (1, "toupper", [C.c_char], C.c_char, [(b"a",), (b"Z",), (b"\xff",)]),
    # 64-bit integers, signed and unsigned, both directions
    (1, "labs", [C.c_long], C.c_long, [(-5,), (-(2 ** 63 - 1),), (2 ** 62,)]),
    (1, "llabs", [C.c_longlong], C.c_longlong, [(-7,), (-(2 ** 63 - 1),)]),
    (1, "labs", [C.c_ulong], C.c_long, [(2 ** 64 - 5,), (2 ** 63 + 7,), (3,)]),
    (1, "llabs", [C.c_ulonglong], C.c_ulonglong, [(2 ** 64 - 6,), (2 ** 63 - 1,)]),
    (1, "labs", [C.c_size_t], C.c_ssize_t, [(2 ** 64 - 7,), (9,)]),
    (1, "labs", [C.c_ssize_t], C.c_size_t, [(-11,), (2 ** 63 - 1,)]),
    (2, "lround", [C.c_double], C.c_ulong, [(-1.0,), (-2.0,), (3.4,)]),
    (2, "llround", [C.c_double], C.c_ulonglong, [(-1.0,), (2.5,)]),
    (2, "lround", [C.c_double], C.c_size_t, [(-3.0,)]),
    # c_void_p arguments given as ints or None
    (1, "labs", [C.c_void_p], C.c_long, [(12345,), (None,), (0,), (2 ** 40,)]),
    # doubles and floats, alone and mixed with ints
    (2, "fabs", [C.c_double], C.c_double, [(-2.5,), (0.1,), (-0.0,), (3,), (float("inf"),)]),
    (2, "copysign", [C.c_double, C.c_double], C.c_double, [(3.0, -0.0), (-1e300, 1.0)]),
    (2, "fma", [C.c_double, C.c_double, C.c_double], C.c_double, [(2.0, 3.0, 0.5), (0.1, 0.2, 0.3)]),
    (2, "ldexp", [C.c_double, C.c_int], C.c_double, [(0.75, 3), (1.0, -1074), (-1.5, -2)]),
    (2, "fabsf", [C.c_float], C.c_float, [(-1.5,), (0.1,), (-3.4e38,), (1e-45,)]),
    (2, "ldexpf", [C.c_float, C.c_int], C.c_float, [(0.1, 2), (-1.0, -149)]),
    (2, "lroundf", [C.c_float], C.c_long, [(-2.5,), (1e9,)]),
    (0, "ffg_mix12", [C.c_int] * 8 + [C.c_double] * 4, C.c_double,
     [(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 0.25, 0.125, 2.0), (-1, -2, -3, -4, -5, -6, -7, -8, -1.0, 1e10, 0, 3)]),
    # no arguments, void result
    (0, "ffg_noop", [], None, [()]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-%s-%s" % (
    c[1], "-".join(t.__name__ for t in c[2]) or "void", c[3].__name__ if c[3] else "None"))
def test_exact_results_like_ctypes(libs, slow_calls, case):
    which, name, argtypes, restype, calls = case
    ifn = declare(libs[which], name, argtypes, restype)
    pfn = declare(libs[which + 3], name, argtypes, restype)
    for args in calls:
        want = pfn(*args)
        for _ in range(2):  # the first call binds the fast path, the second takes it
            got = ifn(*args)
            assert got == want and type(got) is type(want), (name, args, got, want)
            if isinstance(want, float) and want == 0:
                assert str(got) == str(want)  # -0.0 stays -0.0
        assert ifn._fast_bound
    # one Python-path call, the first; every other call took the C path
    assert slow_calls == [name]


def test_descriptor_layout_matches_struct():
    specs = tuple(W.spec_of(t) for t in (C.c_char, C.c_double, C.c_short, C.c_void_p, C.c_float))
    d = W.fast_desc(specs, W.spec_of(C.c_uint))
    assert d[:4] == bytes([5, ord("I"), 36, 0])
    assert list(d[4:]) == [ord("c"), 0, ord("d"), 8, ord("h"), 16, ord("P"), 24, ord("f"), 32]
    # too many arguments, pointers, structures, strings: no descriptor
    assert W.fast_desc((W.spec_of(C.c_int),) * 25, None) is None
    assert W.fast_desc((W.spec_of(C.c_char_p),), None) is None
    assert W.fast_desc((W.spec_of(C.POINTER(C.c_int)),), None) is None
    assert W.fast_desc((), W.spec_of(C.c_void_p)) is None
    assert W.fast_desc((W.spec_of(C.c_double),), None, inferred=True) is None


def test_bad_descriptors_are_refused(libs):
    fn = declare(libs[0], "ffg_add", [C.c_int, C.c_int], C.c_int)
    helper = libs[0]._helper
    for bad in (b"", b"\x01\x00\x04\x00", b"\x01\x00\x04\x00i\x02", b"\x01\x00\x04\x00x\x00",
                b"\x01\x00\x02\x00i\x00", b"\x01P\x04\x00i\x00", b"\x02\x00\x08\x00i\x04i\x00",
                b"\x19" + bytes(3 + 50)):
        with pytest.raises(ValueError):
            fn._bind_fast(helper, 0, bad, 0.0)
    assert not fn._fast_bound


def test_other_argument_kinds_take_the_python_path(libs, slow_calls):
    iso = libs[0]
    fn = declare(iso, "ffg_add", [C.c_int, C.c_int], C.c_int)
    assert fn(1, 2) == 3 and fn(1, 2) == 3
    assert slow_calls == ["ffg_add"]
    del slow_calls[:]
    assert fn(C.c_int(5), True) == 6          # a ctypes instance
    assert fn(2 ** 32 + 1, 1) == 2            # out of range: wraps like c_int
    with pytest.raises(C.ArgumentError):
        fn(1.5, 1)
    with pytest.raises(TypeError):
        fn(1)
    with pytest.raises(TypeError):
        fn(1, 2, x=3)
    assert slow_calls == ["ffg_add"] * 5
    del slow_calls[:]
    assert fn(-3, 2) == -1 and slow_calls == []
    f = declare(libs[2], "fabsf", [C.c_float], C.c_float)
    try:  # out of float's range: the Python path decides, as struct.pack does there
        r = f(1e300)  # (inf on newer Pythons, OverflowError on older ones)
    except OverflowError:
        pass
    else:
        assert r == float("inf")
    assert slow_calls == ["fabsf"]
    v = declare(libs[1], "labs", [C.c_void_p], C.c_long)
    h = Handle(77)
    h.generation = libs[1]._helper.generation
    assert v(h) == 77                           # a Handle is checked on the Python path
    assert v(foreign_buffer(16)) > 0


def test_without_argtypes_ints_are_inferred(libs, slow_calls):
    fn = libs[0]["ffg_add"]  # argtypes None, restype c_int
    assert fn(1, 2) == 3 and fn(4, 5) == 9 and fn._fast_bound
    assert slow_calls == ["ffg_add"]
    assert fn(True, 2) == 3 and fn(2 ** 33 + 1, 0) == 1  # bool, out of range: Python path
    assert fn(C.c_int(-1), 0) == -1
    assert slow_calls == ["ffg_add"] * 4
    assert fn(-7, 7) == 0 and len(slow_calls) == 4


def test_argtypes_and_restype_change_after_a_call(libs, slow_calls):
    fn = declare(libs[0], "ffg_add", [C.c_int, C.c_int], C.c_int)
    assert fn(-1, 0) == -1 and fn(-1, 0) == -1
    fn.argtypes = [C.c_uint, C.c_uint]
    fn.restype = C.c_uint
    assert not fn._fast_bound
    assert fn(0xFFFFFFFF, 0) == 0xFFFFFFFF and fn(0xFFFFFFFF, 0) == 0xFFFFFFFF
    fn.restype = C.c_byte
    assert fn(127, 1) == -128 and fn(127, 1) == -128
    fn.restype = None
    assert fn(1, 2) is None and fn(1, 2) is None
    fn.argtypes = [C.c_char_p, C.c_int]  # not a number: the Python path from now on
    fn.restype = C.c_int
    assert not fn._fast_bound
    fn(b"x", 0)
    assert not fn._fast_bound
    fn.argtypes = [C.c_int, C.c_int]
    assert fn(20, 22) == 42 and fn(20, 22) == 42
    assert slow_calls == ["ffg_add"] * 6


def test_errcheck_on_the_fast_path(libs):
    fn = declare(libs[0], "ffg_add", [C.c_int, C.c_int], C.c_int)
    seen = []

    def check(result, func, args):
        seen.append((result, func, args))
        return result * 10

    fn.errcheck = check
    assert fn(1, 2) == 30 and fn(2, 2) == 40
    assert seen == [(3, fn, (1, 2)), (4, fn, (2, 2))]
    fn.errcheck = None
    assert fn(1, 2) == 3


def test_fault_on_the_fast_path_then_next_call():
    iso = IsolatedCDLL(CRASHERS_PATH)
    try:
        read_at = declare(iso, "ffg_read_at", [C.c_size_t], C.c_int)
        add = declare(iso, "ffg_add", [C.c_int, C.c_int], C.c_int)
        buf = foreign_buffer(4)
        C.memmove(buf, C.byref(C.c_int(-9)), 4)
        assert read_at(C.addressof(buf)) == -9 and read_at(C.addressof(buf)) == -9
        assert read_at._fast_bound and add(1, 2) == 3
        pid = helper_pid(iso)
        with pytest.raises(ffiguard.SegmentationFault) as info:
            read_at(16)
        e = info.value
        assert (e.signal, e.address, e.access, e.function) == (
            signal.SIGSEGV, 16, expected_access("read"), "ffg_read_at")
        assert e.helper_pid == pid and e.symbol == "ffg_read_at"
        assert add(1, 2) == 3 and helper_pid(iso) != pid  # restart="always"
        assert read_at(C.addressof(buf)) == -9
        divide = declare(iso, "ffg_divide", [C.c_int, C.c_int], C.c_int)
        assert divide(17, 5) == 3
        if DIVISION_TRAPS:
            with pytest.raises(ffiguard.ForeignFault) as info:
                divide(1, 0)
            assert info.value.signal == signal.SIGFPE
        else:  # AArch64: division by zero gives 0, no trap; the library raises SIGFPE instead
            assert divide(1, 0) == 0
            raise_ = declare(iso, "ffg_raise", [C.c_int], C.c_int)
            with pytest.raises(ffiguard.ForeignFault) as info:
                raise_(signal.SIGFPE)
            assert info.value.signal == signal.SIGFPE
        assert divide(18, 6) == 3
    finally:
        stop_helper(iso)


def test_fault_on_the_fast_path_restart_never():
    iso = IsolatedCDLL(CRASHERS_PATH, restart="never")
    try:
        abort = declare(iso, "ffg_abort", [], None)
        add = declare(iso, "ffg_add", [C.c_int, C.c_int], C.c_int)
        assert add(2, 3) == 5 and add(2, 3) == 5
        pid = helper_pid(iso)
        for _ in range(2):
            with pytest.raises(ffiguard.ForeignAbort):
                abort()
            assert add(2, 3) == 5 and helper_pid(iso) == pid
    finally:
        stop_helper(iso)


def test_timeout_on_the_fast_path_then_next_call():
    libc = IsolatedCDLL(LIBC, timeout=0.2)
    try:
        sleep = declare(libc, "sleep", [C.c_uint], C.c_uint)
        labs = declare(libc, "labs", [C.c_long], C.c_long)
        assert sleep(0) == 0 and sleep(0) == 0 and sleep._fast_bound
        pid = helper_pid(libc)
        t0 = time.monotonic()
        with pytest.raises(ForeignTimeout) as info:
            sleep(5)
        assert 0.2 <= time.monotonic() - t0 < 1.5
        assert (info.value.timeout, info.value.pid, info.value.function) == (0.2, pid, "sleep")
        assert labs(-4) == 4 and helper_pid(libc) != pid
        sleep.timeout = 0.05  # the function's own timeout, read by the C path
        assert sleep(0) == 0
        t0 = time.monotonic()
        with pytest.raises(ForeignTimeout) as info:
            sleep(5)
        assert time.monotonic() - t0 < 1.0 and info.value.timeout == 0.05
        sleep.timeout = 3
        assert sleep(0) == 0 and labs(-5) == 5
    finally:
        stop_helper(libc)


def test_helper_killed_during_and_between_fast_calls():
    libc = IsolatedCDLL(LIBC)
    try:
        sleep = declare(libc, "sleep", [C.c_uint], C.c_uint)
        labs = declare(libc, "labs", [C.c_long], C.c_long)
        assert labs(-1) == 1 and labs(-2) == 2
        pid = helper_pid(libc)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        with pytest.raises(HelperDied):  # the helper is found dead by this call
            labs(-3)
        assert labs(-3) == 3 and helper_pid(libc) != pid
        pid = helper_pid(libc)
        threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(HelperDied) as info:
            sleep(5)
        assert info.value.signal == signal.SIGKILL
        assert labs(-6) == 6
    finally:
        stop_helper(libc)


def test_use_errno_stays_on_the_python_path():
    libc = IsolatedCDLL(LIBC, use_errno=True)
    try:
        labs = declare(libc, "labs", [C.c_long], C.c_long)
        assert labs(-1) == 1 and labs(-1) == 1 and not labs._fast_bound
    finally:
        stop_helper(libc)


def test_fast_calls_from_threads(libs):
    fn = declare(libs[0], "ffg_add", [C.c_int, C.c_int], C.c_int)
    errors = []

    def work(k):
        try:
            for i in range(500):
                assert fn(i, k) == i + k
        except BaseException as e:  # noqa: B902
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert libs[0]._helper.nfree == libs[0]._helper.nslots


def test_helper_checks_request_length(libs):
    """A request of a fast function with a length other than its descriptor's goes to
    the helper's Python path, which bounds it by the slot: the helper answers and lives."""
    iso = libs[0]
    fn = declare(iso, "ffg_add", [C.c_int, C.c_int], C.c_int)
    assert fn(1, 2) == 3
    helper = iso._helper
    fid = helper.fids[fn._plan.key]
    slot = helper.acquire()
    try:
        W.U32.pack_into(slot.mem, slot.base + W.SLOT_HEAD, 5)
        W.U32.pack_into(slot.mem, slot.base + W.SLOT_HEAD + 4, 6)
        for req_len in (8, 0, 1 << 30):
            W.U32.pack_into(slot.mem, slot.base + W.OFF_OP, fid)
            W.U32.pack_into(slot.mem, slot.base + W.OFF_REQ_LEN, req_len)
            st = _isolate.exchange(slot, W.CALL, W.CALL, 0, helper.pid)
            assert st == W.REPLY
            assert W.U32.unpack_from(slot.mem, slot.base + W.OFF_STATUS)[0] == W.OK
    finally:
        helper.release(slot)
    assert fn(2, 3) == 5 and not helper.dead
