"""isolate mode: the library runs in a helper process; faults, exits, hangs and
kills of the helper become exceptions in the host, which goes on."""
import ctypes
import errno
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import ffiguard
from conftest import (CALLBACK, CRASHERS_PATH, PC_REG, UNDER_QEMU, Big, Point, expected_access,
                      same_file, setup_signatures)
from ffiguard.isolate import (
    ForeignExit, ForeignTimeout, Handle, HelperDied, HelperUnavailable, IsolatedCDLL,
    StaleHandle, foreign_buffer, foreign_new, helper_pid, in_foreign_heap, restart_helper,
    stop_helper,
)

LIBC = "libc.so.6"


def isolated_crashers(**kw):
    return setup_signatures(IsolatedCDLL(CRASHERS_PATH, **kw))


@pytest.fixture(scope="module")
def iso():
    lib = isolated_crashers()
    yield lib
    stop_helper(lib)


def isolated_libc(**kw):
    libc = IsolatedCDLL(LIBC, **kw)
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free.restype = None
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    libc.strlen.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    libc.strchr.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.strchr.restype = ctypes.c_char_p
    libc.sleep.argtypes = [ctypes.c_uint]
    libc.sleep.restype = ctypes.c_uint
    libc.pause.argtypes = []
    libc.exit.argtypes = [ctypes.c_int]
    libc.exit.restype = None
    return libc


@pytest.fixture(scope="module")
def libc():
    lib = isolated_libc()
    yield lib
    stop_helper(lib)


def alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid, seconds=5.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------- calls


def test_scalars_and_structs_exact(iso):
    assert iso.ffg_add(2, 40) == 42
    assert iso.ffg_add(-5, 3) == -2
    assert iso.ffg_mix12(1, 2, 3, 4, 5, 6, 7, 8, 0.5, 0.25, 0.125, 2.0) == \
        1 + 4 + 9 + 16 + 25 + 36 + 49 + 64 + 0.5 * 9 + 0.25 * 10 + 0.125 * 11 + 2.0 * 12
    p = iso.ffg_make_point(-7, 9)
    assert isinstance(p, Point) and (p.x, p.y) == (-7, 9)
    assert iso.ffg_point_sum(Point(3, 4)) == 3004
    assert iso.ffg_point_sum(p) == -7000 + 9
    b = iso.ffg_make_big(100)
    assert isinstance(b, Big) and (b.a, b.b, b.c, b.d) == (100, 101, 102, 103)
    assert iso.ffg_divide(17, 5) == 3


def test_ctypes_conversions_like_ctypes(iso):
    assert iso.ffg_add(ctypes.c_int(5), True) == 6
    assert iso.ffg_add(2 ** 32 + 1, 1) == 2  # wraps like c_int
    with pytest.raises(ctypes.ArgumentError):
        iso.ffg_add(1.5, 1)
    with pytest.raises(TypeError):
        iso.ffg_add(1)


def test_variadic_without_argtypes(iso):
    assert iso.ffg_vsum(3, ctypes.c_long(1), ctypes.c_long(2), ctypes.c_long(3)) == 1 + 4 + 9
    assert iso.ffg_vsumd(2, ctypes.c_double(1.5), ctypes.c_double(2.0)) == 1.5 + 4.0


def test_out_parameters_byref_pointer_array(iso):
    x = ctypes.c_int(0)
    assert iso.ffg_fill(ctypes.byref(x), 42) == 1
    assert x.value == 42
    y = ctypes.c_int(0)
    assert iso.ffg_fill(ctypes.pointer(y), -9) == 1
    assert y.value == -9
    z = ctypes.c_int(0)
    assert iso.ffg_fill(z, 77) == 1  # ctypes passes an instance by reference
    assert z.value == 77
    arr = (ctypes.c_int * 4)(1, 2, 3, 4)
    assert iso.ffg_fill(arr, 5) == 1
    assert list(arr) == [5, 2, 3, 4]
    arr2 = (ctypes.c_int * 4)(1, 2, 3, 4)
    assert iso.ffg_fill(ctypes.byref(arr2, 8), 6) == 1  # byref with an offset
    assert list(arr2) == [1, 2, 6, 4]


def test_buffers_copied_in_and_back(libc):
    small = ctypes.create_string_buffer(b"hello", 64)
    assert libc.memset(small, ord("x"), 3) is not None
    assert small.value == b"xxxlo"
    big = ctypes.create_string_buffer(1 << 20)  # larger than a slot: via the foreign heap
    libc.memset(big, ord("A"), (1 << 20) - 1)
    assert big.raw == b"A" * ((1 << 20) - 1) + b"\0"


def test_foreign_buffer_is_zero_copy(libc):
    fb = foreign_buffer(1 << 20)
    assert in_foreign_heap(ctypes.addressof(fb), 1 << 20)
    r = libc.memset(fb, ord("B"), 100)
    # memset returns its argument: the same address in the helper as in the host
    assert r == ctypes.addressof(fb) and not isinstance(r, Handle)
    assert fb.raw[:101] == b"B" * 100 + b"\0"
    fb2 = foreign_buffer(b"abc")
    assert fb2.raw == b"abc\0" and libc.strlen(fb2) == 3
    pt = foreign_new(Point)
    libc.memset(ctypes.byref(pt), 1, ctypes.sizeof(Point))
    assert (pt.x, pt.y) == (0x01010101, 0x01010101)


def test_char_p_arguments_and_results(libc):
    assert libc.strlen(b"hello, world") == 12
    assert libc.strchr(b"hello", ord("l")) == b"llo"
    assert libc.strchr(b"hello", ord("z")) is None
    assert libc.strlen(ctypes.c_char_p(b"abc")) == 3


def test_handles_pass_back_and_go_stale():
    libc = isolated_libc()
    try:
        h = libc.malloc(64)
        assert isinstance(h, Handle) and h != 0 and h.generation == libc._helper.generation
        assert libc.memset(h, 0, 64) == h
        libc.free(h)
        restart_helper(libc)
        with pytest.raises(StaleHandle):
            libc.free(h)
        with pytest.raises(ffiguard.ForeignFault):
            libc.free(h)
    finally:
        stop_helper(libc)


def test_callback_called_in_host_with_arguments(iso):
    seen = []

    def cb(v):
        seen.append((v, threading.get_ident()))
        return v * 3

    assert iso.ffg_call_callback(cb, 14) == 43
    assert iso.ffg_call_callback(CALLBACK(lambda v: v - 1), 10) == 10
    assert seen == [(14, threading.get_ident())]


def test_callback_exception_is_reported_and_returns_zero(iso, capfd):
    def bad(v):
        raise RuntimeError("boom %d" % v)

    assert iso.ffg_call_callback(bad, 3) == 1
    assert "boom 3" in capfd.readouterr().err


def test_nested_isolated_call_from_callback(iso):
    assert iso.ffg_call_callback(lambda v: iso.ffg_add(v, 100), 1) == 102


def test_errcheck_and_errno():
    libc = IsolatedCDLL(LIBC, use_errno=True)
    try:
        libc.close.argtypes = [ctypes.c_int]  # C names never clash with the library object
        assert libc.close(-1) == -1
        assert ctypes.get_errno() == errno.EBADF
        ctypes.set_errno(0)
        assert libc.close(5000) == -1 and ctypes.get_errno() == errno.EBADF
        libc.close.errcheck = lambda result, func, args: ("checked", result, args)
        assert libc.close(-1) == ("checked", -1, (-1,))
    finally:
        stop_helper(libc)


def test_missing_symbol_and_library():
    with pytest.raises(AttributeError):
        IsolatedCDLL(LIBC).no_such_function_here
    with pytest.raises(OSError):
        IsolatedCDLL("/nonexistent/libnothing.so")


class WithPointer(ctypes.Structure):
    _fields_ = [("p", ctypes.POINTER(ctypes.c_int)), ("n", ctypes.c_int)]


def test_unsupported_types_are_type_errors(iso):
    f = iso["ffg_point_sum"]
    with pytest.raises(TypeError, match="contains pointers"):
        f.argtypes = [WithPointer]
    with pytest.raises(TypeError, match="c_longdouble"):
        f.argtypes = [ctypes.c_longdouble]
    with pytest.raises(TypeError, match="PYFUNCTYPE"):
        f.argtypes = [ctypes.PYFUNCTYPE(ctypes.c_int)]
    g = iso["ffg_fill"]
    g.argtypes = [ctypes.c_void_p, ctypes.c_int]
    with pytest.raises(ctypes.ArgumentError, match="contains pointers"):
        g(WithPointer(), 1)
    with pytest.raises(ctypes.ArgumentError, match="host"):
        g(CALLBACK(lambda v: v), 1)


# ---------------------------------------------------------------- faults


def test_null_deref_full_record_then_next_call(iso):
    pid = helper_pid(iso)
    with pytest.raises(ffiguard.SegmentationFault) as info:
        iso.ffg_read_null()
    e = info.value
    assert type(e) is ffiguard.SegmentationFault
    assert (e.signal, e.code_name, e.address, e.access) == (
        signal.SIGSEGV, "SEGV_MAPERR", 0, expected_access("read"))
    assert e.function == "ffg_read_null" and e.symbol == "ffg_read_at"
    assert same_file(e.library, CRASHERS_PATH)
    assert e.frames[0] == e.pc and len(e.frames) >= 2
    assert e.helper_pid == pid
    assert "ffg_read_at" in str(e) and "during call to ffg_read_null" in str(e)
    assert iso.ffg_add(1, 2) == 3  # restart="always": a fresh helper
    assert helper_pid(iso) != pid and wait_gone(pid)


def test_abort_then_next_call(iso):
    with pytest.raises(ffiguard.ForeignAbort) as info:
        iso.ffg_abort()
    assert info.value.signal == signal.SIGABRT and info.value.address is None
    assert iso.ffg_add(3, 4) == 7


def test_exit_3_then_next_call(libc):
    pid = helper_pid(libc)
    with pytest.raises(ForeignExit) as info:
        libc.exit(3)
    e = info.value
    assert isinstance(e, HelperDied) and isinstance(e, ffiguard.ForeignFault)
    assert (e.exit_code, e.pid, e.function) == (3, pid, "exit")
    assert "exited with status 3" in str(e)
    assert libc.strlen(b"ok") == 2
    assert helper_pid(libc) != pid and not alive(pid)


def test_double_free_then_next_call(libc):
    h = libc.malloc(32)
    libc.free(h)
    with pytest.raises(ffiguard.ForeignAbort) as info:
        libc.free(h)
    assert info.value.function == "free"
    assert libc.strlen(b"four") == 4


def test_endless_call_times_out_then_next_call():
    libc = isolated_libc(timeout=0.2)
    try:
        pid = helper_pid(libc)
        t0 = time.monotonic()
        with pytest.raises(ForeignTimeout) as info:
            libc.pause()
        assert 0.2 <= time.monotonic() - t0 < 1.5
        assert (info.value.timeout, info.value.pid, info.value.function) == (0.2, pid, "pause")
        assert not alive(pid)
        assert libc.strlen(b"abc") == 3
        # a function's own timeout overrides the library's
        libc.sleep.timeout = 0.05
        t0 = time.monotonic()
        with pytest.raises(ForeignTimeout):
            libc.sleep(5)
        assert time.monotonic() - t0 < 1.0
        libc.sleep.timeout = 3
        assert libc.sleep(0) == 0
    finally:
        stop_helper(libc)


def test_helper_killed_during_call():
    libc = isolated_libc()
    try:
        pid = helper_pid(libc)
        threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(HelperDied) as info:
            libc.sleep(5)
        assert type(info.value) is HelperDied
        assert info.value.signal == signal.SIGKILL and info.value.exit_code is None
        assert libc.strlen(b"x") == 1
    finally:
        stop_helper(libc)


def test_restart_never_keeps_helper_after_fault_then_unavailable_after_death():
    lib = isolated_crashers(restart="never")
    try:
        pid = helper_pid(lib)
        with pytest.raises(ffiguard.SegmentationFault):
            lib.ffg_read_null()
        assert lib.ffg_add(1, 1) == 2 and helper_pid(lib) == pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(HelperDied):
            lib.ffg_add(1, 1)
        with pytest.raises(HelperUnavailable):
            lib.ffg_add(1, 1)
        restart_helper(lib)
        assert lib.ffg_add(2, 2) == 4 and helper_pid(lib) != pid
    finally:
        stop_helper(lib)


def test_helper_exceptions_pickle():
    e = ForeignExit("x", exit_code=3, pid=12, function="exit", signal=None)
    r = pickle.loads(pickle.dumps(e))
    assert type(r) is ForeignExit and (r.exit_code, r.pid, r.function, str(r)) == (3, 12, "exit", "x")


# ---------------------------------------------------------------- the process


def _open_files(pid):
    """What the fds above 2 of process `pid` refer to (readlink of /proc/pid/fd/N)."""
    found = {}
    for name in os.listdir("/proc/%s/fd" % pid):
        try:
            found[int(name)] = os.readlink("/proc/%s/fd/%s" % (pid, name))
        except FileNotFoundError:  # the fd listdir() itself used, closed by now
            pass
    return {fd: what for fd, what in found.items() if fd > 2}


def test_no_inherited_file_descriptors():
    # The helper must hold nothing of the host's but its channel (one socket end). It
    # does hold files it opens itself: since Python 3.14, `import ctypes` makes libffi
    # open its own library file (to map its closure trampolines from it), so a helper
    # holds an fd of libffi.so.8 that no host passed it. So the expectation is: the
    # helper's fds are exactly those of a fresh interpreter of the same Python after
    # `import ctypes` (none before 3.14), plus the socket, and none of the host's
    # inheritable fds (a pipe made here).
    fresh = subprocess.run(
        [sys.executable, "-c", "import ctypes, os, sys; print(repr(sorted(os.readlink("
         "'/proc/self/fd/%s' % n) for n in os.listdir('/proc/self/fd') if int(n) > 2 and "
         "os.path.exists('/proc/self/fd/%s' % n))))"],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    expected = eval(fresh.stdout)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    try:
        lib = IsolatedCDLL(LIBC)
        try:
            held = _open_files(helper_pid(lib))
            sockets = [what for what in held.values() if what.startswith("socket:")]
            assert len(sockets) == 1, held
            assert sorted(what for what in held.values() if not what.startswith("socket:")) \
                == expected, held
            assert os.readlink("/proc/self/fd/%d" % r) not in held.values()
        finally:
            stop_helper(lib)
    finally:
        os.close(r)
        os.close(w)


def test_limits_set_in_helper():
    lib = IsolatedCDLL(LIBC, limits={"data": 512 << 20, "address_space": 4 << 30, "cpu": 60})
    try:
        with open("/proc/%d/limits" % helper_pid(lib)) as f:
            rows = {line[:26].strip(): line[26:].split() for line in f}
        assert rows["Max cpu time"][:2] == ["60", "61"]
        if UNDER_QEMU:
            # qemu-user accepts RLIMIT_DATA/RLIMIT_AS but applies neither (they would
            # limit the emulator's own memory): the helper asked, the host shows none.
            assert rows["Max data size"][:2] == rows["Max address space"][:2] == ["unlimited"] * 2
            return
        # On top of what the helper used once started (docs/isolate.md): at most that
        # much more than asked, and it has not grown since.
        with open("/proc/%d/status" % helper_pid(lib)) as f:
            used = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmData", "VmSize")}
        for row, asked, now in (("Max data size", 512 << 20, used["VmData"]),
                                ("Max address space", 4 << 30, used["VmSize"])):
            soft, hard = map(int, rows[row][:2])
            assert soft == hard and 0 < soft - asked <= now, (row, soft, now)
        lib.malloc.argtypes = [ctypes.c_size_t]
        lib.malloc.restype = ctypes.c_void_p
        assert lib.malloc(1 << 30) is None  # over RLIMIT_DATA
    finally:
        stop_helper(lib)


def test_host_killed_leaves_no_helper(run_python):
    code = """
    import sys, time
    sys.path.insert(0, %r)
    import ffiguard.isolate as iso
    lib = iso.IsolatedCDLL("libc.so.6")
    print(os.getpid(), iso.helper_pid(lib), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """ % os.path.dirname(os.path.dirname(ffiguard.__file__))
    rc, out, err = run_python(code)
    assert rc == -signal.SIGKILL, err
    host, helper = map(int, out.split())
    assert wait_gone(helper, 5.0), "helper %d outlived its host" % helper


def test_helper_started_from_short_lived_thread_survives_it():
    box = []
    t = threading.Thread(target=lambda: box.append(isolated_crashers()))
    t.start()
    t.join()
    lib = box[0]
    try:
        time.sleep(0.05)
        assert alive(helper_pid(lib))
        assert lib.ffg_add(1, 2) == 3
    finally:
        stop_helper(lib)


def test_many_threads_concurrently(iso):
    failures = []

    def work(i):
        try:
            out = ctypes.c_int()
            for r in range(300):
                assert iso.ffg_add(i, r) == i + r
                iso.ffg_fill(ctypes.byref(out), i * 1000 + r)
                assert out.value == i * 1000 + r
        except BaseException as exc:  # noqa: B902
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures[0]


def test_close_stops_helper():
    lib = IsolatedCDLL(LIBC)
    pid = helper_pid(lib)
    stop_helper(lib)
    assert helper_pid(lib) is None and wait_gone(pid)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_gets_its_own_helper(iso):
    parent_helper = helper_pid(iso)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            ok = iso.ffg_add(20, 22) == 42 and helper_pid(iso) not in (None, parent_helper)
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 10) == b"ok"
    os.close(r)
    os.waitpid(pid, 0)
    assert helper_pid(iso) == parent_helper and iso.ffg_add(1, 1) == 2


def test_fault_record_travels_as_data_not_pickle(iso):
    # The helper's reply is JSON: a fault rebuilds as the trap-mode class with its
    # registers, and pickles again on the host like any ForeignFault.
    with pytest.raises(ffiguard.SegmentationFault) as info:
        iso.ffg_write_null()
    e = info.value
    assert e.access == expected_access("write") and e.registers[PC_REG] == e.pc
    r = pickle.loads(pickle.dumps(e))
    assert (type(r), r.pc, r.frames, str(r)) == (type(e), e.pc, e.frames, str(e))
