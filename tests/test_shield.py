"""shield mode (issue 13): memory locked against guarded foreign calls.

The same tests run natively (this machine's mechanism: the mprotect fallback where the CPU
hides protection keys) and inside pku-env (protection keys; tools/test-pku). There
FFIGUARD_EXPECT_PKU=1 is set, and every test fails (not skips) if the keys are missing.
"""
import ctypes
import mmap
import os
import platform
import threading

import pytest

import ffiguard
from ffiguard import _core
from ffiguard.shield import mechanism

from conftest import CALLBACK, UNDER_QEMU, expected_access

PAGE = mmap.PAGESIZE
MECH = mechanism()[0]
PKEYS = MECH == "pkeys"
SEGV_PKUERR = 4
pytestmark = pytest.mark.skipif(ffiguard.shield.mechanism()[0] not in ("pkeys", "mprotect"),
                                reason="no shield mechanism")


def test_expected_mechanism():
    """pku-env's runner sets FFIGUARD_EXPECT_PKU=1: protection keys must be in use there."""
    if os.environ.get("FFIGUARD_EXPECT_PKU") == "1":
        assert MECH == "pkeys", mechanism()
    else:
        assert MECH in ("pkeys", "mprotect")


def address_of(buf):
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def pkey_of(buf):
    start = address_of(buf)
    for s, length, access, pkey in ffiguard.shield.shielded():
        if s <= start < s + length:
            return pkey
    raise AssertionError("not shielded")


def our_bits(key):
    return 3 << (2 * key)


@pytest.fixture
def shielded_buf():
    buf = ffiguard.protected_buffer(2 * PAGE)
    buf[:8] = b"original"
    yield buf
    ffiguard.unshield(buf)
    buf.close()


@pytest.fixture
def secret_buf():
    buf = ffiguard.protected_buffer(PAGE, access="none")
    buf[:6] = b"secret"
    yield buf
    ffiguard.unshield(buf)
    buf.close()


def check_violation(e, address, buf):
    assert isinstance(e, ffiguard.SegmentationFault)
    assert e.address == address
    if PKEYS:
        assert e.code_name == "SEGV_PKUERR"
        assert e.pkey == pkey_of(buf) and e.pkey >= 1
    else:
        assert e.code_name == "SEGV_ACCERR"
        assert e.pkey is None


def test_foreign_write_raises_and_bytes_unchanged(crashers, shielded_buf):
    target = address_of(shielded_buf) + PAGE + 3  # an odd byte in the second page
    with pytest.raises(ffiguard.ProtectionKeyViolation) as info:
        crashers.ffg_write_at(target, 0x41414141)
    check_violation(info.value, target, shielded_buf)
    assert bytes(shielded_buf[PAGE:PAGE + 16]) == bytes(16)
    assert bytes(shielded_buf[:8]) == b"original"
    # read-only: guarded reads work
    assert crashers.ffg_read_at(address_of(shielded_buf)) == int.from_bytes(b"orig", "little")


def test_none_blocks_foreign_reads(crashers, secret_buf):
    target = address_of(secret_buf) + 1
    with pytest.raises(ffiguard.ProtectionKeyViolation) as info:
        crashers.ffg_read_at(target)
    check_violation(info.value, target, secret_buf)
    assert info.value.access == expected_access("read")
    assert bytes(secret_buf[:6]) == b"secret"  # Python still reads it


def test_python_reads_and_writes(crashers, shielded_buf):
    crashers.ffg_noop()
    shielded_buf[100:104] = b"abcd"
    assert bytes(shielded_buf[100:104]) == b"abcd"
    crashers.ffg_noop()
    assert crashers.ffg_read_at(address_of(shielded_buf) + 100) == int.from_bytes(b"abcd", "little")


def test_stopped_shielded_call_puts_the_lock_back(crashers, shielded_buf):
    # interrupt (issue 16): a shielded call stopped by its timeout resumes through the
    # same return path as a fault: Python code can write afterwards, guarded code cannot
    target = address_of(shielded_buf) + 8
    spin = ffiguard.guard(crashers.ffg_spin_forever, timeout=0.2)
    for i in range(3):
        with pytest.raises(ffiguard.ForeignTimeout) as info:
            spin()
        assert info.value.symbol == "ffg_spin_forever"
        shielded_buf[8] = i + 1
        with pytest.raises(ffiguard.ProtectionKeyViolation) as info:
            crashers.ffg_write_at(target, 0x7f)
        check_violation(info.value, target, shielded_buf)
        assert shielded_buf[8] == i + 1


def test_unshield_and_shield_false(crashers, shielded_buf):
    target = address_of(shielded_buf) + 8
    unshielded = ffiguard.guard(crashers.ffg_write_at, shield=False)
    assert not unshielded.__shield__ and crashers.ffg_write_at.__shield__
    unshielded(target, 7)  # per function: no lock
    assert shielded_buf[8] == 7
    lib = ffiguard.CDLL(ffiguard.crashers_path(), shield=False)  # per library
    lib.ffg_write_at.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.ffg_write_at(target, 9)
    assert shielded_buf[8] == 9
    with pytest.raises(ffiguard.ProtectionKeyViolation):
        crashers.ffg_write_at(target, 1)
    cffi = pytest.importorskip("cffi")
    ffi = cffi.FFI()
    ffi.cdef("void ffg_write_at(size_t address, int value);")
    glib = ffiguard.guard(ffi, ffi.dlopen(ffiguard.crashers_path()))
    with pytest.raises(ffiguard.ProtectionKeyViolation):  # cffi: shielded by default
        glib.ffg_write_at(target, 1)
    ffiguard.guard(glib.ffg_write_at, shield=False)(target, 13)  # per function
    assert shielded_buf[8] == 13
    ffiguard.unshield(shielded_buf)
    crashers.ffg_write_at(target, 11)
    assert shielded_buf[8] == 11
    ffiguard.shield(shielded_buf)  # for the fixture's unshield


def test_cffi_shield_false_per_library(shielded_buf):
    """cffi: guard(ffi, lib, shield=False) and guard(lib, shield=False) (every function
    of the library unlocked), also for a library guarded already (install()'s
    ffi.dlopen): a new GuardedLibrary; the shielded one keeps locking."""
    cffi = pytest.importorskip("cffi")
    target = address_of(shielded_buf) + 8
    ffi = cffi.FFI()
    ffi.cdef("void ffg_write_at(size_t address, int value);")
    raw = ffi.dlopen(ffiguard.crashers_path())
    loose = ffiguard.guard(ffi, raw, shield=False)
    assert not loose.ffg_write_at.__shield__
    loose.ffg_write_at(target, 21)
    assert shielded_buf[8] == 21
    assert not ffiguard.guard(raw, shield=False).ffg_write_at.__shield__
    tight = ffiguard.guard(ffi, raw)
    assert ffiguard.guard(tight) is tight and ffiguard.guard(tight, shield=True) is tight
    with pytest.raises(ffiguard.ProtectionKeyViolation):
        tight.ffg_write_at(target, 1)
    relaxed = ffiguard.guard(tight, shield=False)  # e.g. what install() guarded
    assert relaxed is not tight and relaxed.__wrapped__ is raw
    relaxed.ffg_write_at(target, 22)
    assert shielded_buf[8] == 22
    with pytest.raises(ffiguard.ProtectionKeyViolation):
        tight.ffg_write_at(target, 2)
    assert shielded_buf[8] == 22


def test_bad_buffers():
    with pytest.raises(ValueError, match=r"whole pages .* 0x[0-9a-f]+-0x[0-9a-f]+ \(100 bytes\)"):
        ffiguard.shield(bytearray(100))
    m = mmap.mmap(-1, 3 * PAGE)
    view = (ctypes.c_char * PAGE).from_buffer(m, 1)  # starts inside a page
    start = ctypes.addressof(view)
    with pytest.raises(ValueError) as info:
        ffiguard.shield(view)
    assert "the whole pages inside it are 0x%x-0x%x" % (start - 1 + PAGE, start - 1 + PAGE) \
        not in str(info.value)  # it spans no whole page
    assert "contains no whole page" in str(info.value)
    big = (ctypes.c_char * (2 * PAGE)).from_buffer(m, 1)
    with pytest.raises(ValueError, match="the whole pages inside it are 0x%x-0x%x"
                       % (ctypes.addressof(big) - 1 + PAGE, ctypes.addressof(big) - 1 + 2 * PAGE)):
        ffiguard.shield(big)
    del view, big, info
    with pytest.raises(TypeError, match="read-only"):
        ffiguard.shield(b"x" * PAGE)
    with pytest.raises(ValueError, match="access"):
        ffiguard.shield(m, access="write-only")
    with pytest.raises(ValueError, match="not shielded"):
        ffiguard.unshield(m)
    m.close()


def test_mmap_object(crashers):
    m = mmap.mmap(-1, PAGE + 10)  # the mapping covers its last page whole
    ffiguard.shield(m)
    try:
        with pytest.raises(ValueError, match="already shielded"):
            ffiguard.shield(m)
        with pytest.raises(ffiguard.ProtectionKeyViolation):
            crashers.ffg_write_at(address_of(m) + PAGE + 12, 1)
        m[PAGE + 5] = 1
    finally:
        ffiguard.unshield(m)
    m.close()


def test_thread_created_before_shield(run_python):
    """With protection keys a thread older than the key has it access-disabled: its first
    touch opens ffiguard's keys for it (the handler edits PKRU in the signal frame)."""
    code = r'''
    import threading, ffiguard
    from ffiguard import _core
    go, done = threading.Event(), threading.Event()
    out = []
    def worker():
        go.wait()
        buf[5] = 42                # write first: the key is access-disabled here
        out.append(buf[5] + buf[6])
        out.append(_core.shield_pkru())
        done.set()
    t = threading.Thread(target=worker); t.start()
    buf = ffiguard.protected_buffer(4096)
    buf[6] = 1
    go.set(); done.wait(); t.join()
    print(out[0], 0 if out[1] is None else (out[1] >> (2 * ffiguard.shield.shielded()[0][3])) & 3,
          _core.shield_stats()["opened"] >= (1 if out[1] is not None else 0))
    '''
    rc, out, err = run_python(code)
    assert (rc, out.split()) == (0, ["43", "0", "True"]), err


def test_other_thread_unaffected_during_guarded_call(crashers, shielded_buf):
    inside, written = threading.Event(), threading.Event()
    seen = []

    def cb(x):  # runs inside the guarded call: wait until the other thread wrote
        inside.set()
        assert written.wait(30)
        return x

    def writer():
        assert inside.wait(30)
        shielded_buf[200] = 99
        seen.append(shielded_buf[200])
        written.set()

    t = threading.Thread(target=writer)
    t.start()
    assert crashers.ffg_call_callback(CALLBACK(cb), 5) == 6
    t.join()
    assert seen == [99]
    with pytest.raises(ffiguard.ProtectionKeyViolation):  # still locked for the next call
        crashers.ffg_write_at(address_of(shielded_buf), 1)


def test_callback_can_write(crashers, shielded_buf):
    def cb(x):
        shielded_buf[300] = x
        return x

    assert crashers.ffg_call_callback(CALLBACK(cb), 17) == 18
    assert shielded_buf[300] == 17


def test_wrapped_callback_relocks(crashers, shielded_buf):
    """ffiguard.shield.callback: open while it runs, locked again after it returns."""
    pkrus = []

    @ffiguard.shield.callback
    def cb(x):
        shielded_buf[400] = 1
        pkrus.append(_core.shield_pkru())
        return 0

    target = address_of(shielded_buf) + 401
    with pytest.raises(ffiguard.ProtectionKeyViolation) as info:
        crashers.ffg_call_then_write(CALLBACK(cb), target, 5)
    check_violation(info.value, target, shielded_buf)
    assert shielded_buf[400] == 1 and shielded_buf[401] == 0
    if PKEYS:
        assert pkrus[0] & our_bits(pkey_of(shielded_buf)) == 0


def test_nested_guarded_calls_restore_pkru(crashers, shielded_buf):
    key = pkey_of(shielded_buf)
    target = address_of(shielded_buf) + 500
    before = _core.shield_pkru()
    levels = []

    def inner(x):
        levels.append(("inner", _core.shield_pkru()))
        return x

    @ffiguard.shield.callback
    def outer(x):
        levels.append(("outer-start", _core.shield_pkru()))
        assert crashers.ffg_call_callback(CALLBACK(inner), 1) == 2
        levels.append(("after-inner", _core.shield_pkru()))
        with pytest.raises(ffiguard.ProtectionKeyViolation):
            crashers.ffg_write_at(target, 3)  # a nested guarded call faults
        levels.append(("after-fault", _core.shield_pkru()))
        shielded_buf[501] = 4  # open again in the callback
        return x

    assert crashers.ffg_call_callback(CALLBACK(outer), 1) == 2
    assert _core.shield_pkru() == before
    assert shielded_buf[500] == 0 and shielded_buf[501] == 4
    assert [name for name, _ in levels] == ["outer-start", "inner", "after-inner", "after-fault"]
    if PKEYS:
        values = dict(levels)
        write_disabled = 2 << (2 * key)
        assert before & our_bits(key) == 0
        assert values["outer-start"] & our_bits(key) == 0  # the callback: open
        assert values["inner"] & our_bits(key) == write_disabled  # a plain callback: locked
        assert values["after-inner"] == values["outer-start"]
        assert values["after-fault"] == values["outer-start"]
    with pytest.raises(ffiguard.ProtectionKeyViolation):
        crashers.ffg_write_at(target, 3)


def test_thousand_faults_then_state_right_on_every_thread(crashers, shielded_buf):
    start, stop = threading.Barrier(4), threading.Event()
    after = {}

    def worker(i):
        before = _core.shield_pkru()
        start.wait()
        stop.wait()
        shielded_buf[600 + i] = i + 1
        after[i] = (before, _core.shield_pkru(), shielded_buf[600 + i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    start.wait()
    main_before = _core.shield_pkru()
    base = address_of(shielded_buf)
    for i in range(1000):
        target = base + (i * 37) % (2 * PAGE - 4)
        try:
            crashers.ffg_write_at(target, -1)
        except ffiguard.ProtectionKeyViolation as e:
            assert e.address == target
        else:
            raise AssertionError("write %d went through" % i)
    stop.set()
    for t in threads:
        t.join()
    assert _core.shield_pkru() == main_before
    assert bytes(shielded_buf[:8]) == b"original" and shielded_buf[8:600] == bytes(592)
    for i, (before, now, value) in after.items():
        assert now == before and value == i + 1
    shielded_buf[700] = 1  # and Python here still writes
    assert crashers.ffg_add(2, 3) == 5


def test_pkuerr_outside_guarded_call_not_swallowed(run_python):
    """A protection-key fault of the host's own (a key that is not ffiguard's) dies as
    without ffiguard; under the fallback, the same for a read-only page."""
    code = r'''
    import ffiguard, mmap
    libc = ctypes.CDLL(None, use_errno=True)
    keep = ffiguard.protected_buffer(4096)        # shield active
    page = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    if ffiguard.shield.mechanism()[0] == "pkeys":
        key = libc.pkey_alloc(0, 1)                # PKEY_DISABLE_ACCESS in this thread
        assert key > 0 and libc.pkey_mprotect(ctypes.c_void_p(addr), 4096, 3, key) == 0
    else:
        assert libc.mprotect(ctypes.c_void_p(addr), 4096, 1) == 0
    sys.stdout.write("touching\n"); sys.stdout.flush()
    ctypes.c_char.from_address(addr).value = b"x"
    print("survived")
    '''
    rc, out, err = run_python(code)
    assert rc == -11 and out == "touching\n", (rc, out, err)


def test_other_fault_on_shielded_page_not_swallowed(run_python):
    """Host code faulting on a shielded page for another reason (here: the page made
    read-only by the host itself) dies as without ffiguard, under either mechanism."""
    code = r'''
    import ffiguard
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ffiguard.protected_buffer(4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(addr), 4096, 1) == 0      # PROT_READ, by the host
    sys.stdout.write("touching\n"); sys.stdout.flush()
    buf[0] = 1
    print("survived")
    '''
    rc, out, err = run_python(code)
    assert rc == -11 and out == "touching\n", (rc, out, err)


def test_shielded_call_makes_no_system_call(run_python):
    """With protection keys a shielded call costs no system call, whatever the size
    shielded (checked with a seccomp filter that kills on any system call but write and
    exit_group); the mprotect fallback makes two per region and call (killed: SIGSYS)."""
    if UNDER_QEMU:
        pytest.skip("qemu-user does not implement seccomp filters (prctl fails)")
    write_nr, exit_group_nr = {"x86_64": (1, 231), "aarch64": (64, 94)}[platform.machine()]
    code = r'''
    import ffiguard, mmap, struct
    WRITE_NR, EXIT_GROUP_NR = %d, %d
    lib = ffiguard.CDLL(CRASHERS_PATH); setup_signatures(lib)
    regions = [ffiguard.protected_buffer(1 << 20), ffiguard.shield(mmap.mmap(-1, 64 << 20)),
               ffiguard.shield(mmap.mmap(-1, 1 << 30), access="none")]
    for _ in range(3):
        lib.ffg_add(1, 2)
    libc = ctypes.CDLL(None, use_errno=True)
    BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
    ALLOW, KILL = 0x7fff0000, 0x80000000
    insns = [(BPF_LD_W_ABS, 0, 0, 0), (BPF_JEQ_K, 2, 0, WRITE_NR), (BPF_JEQ_K, 1, 0, EXIT_GROUP_NR),
             (BPF_RET_K, 0, 0, KILL), (BPF_RET_K, 0, 0, ALLOW)]
    prog_bytes = b"".join(struct.pack("HBBI", *i) for i in insns)
    filt = ctypes.create_string_buffer(prog_bytes)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(len(insns), ctypes.addressof(filt))
    assert libc.prctl(38, 1, 0, 0, 0) == 0                       # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0      # SECCOMP_MODE_FILTER
    total = 0
    for i in range(1000):
        total += lib.ffg_add(i, 1)
    os.write(1, b"%%d calls, no system call\n" %% total)
    os._exit(0)
    ''' % (write_nr, exit_group_nr)
    rc, out, err = run_python(code, timeout=120)
    if PKEYS:
        assert (rc, out) == (0, "500500 calls, no system call\n"), err
    else:
        assert rc == -31 and out == "", (rc, out, err)  # SIGSYS: mprotect


def test_previous_handler_reads_shielded_memory(run_python):
    """A fault ffiguard does not recover goes to the previous handler with ffiguard's keys
    open (a handler starts with keys 1-15 access-disabled: faulthandler walks the heap).
    The previous handler here reads a shielded "none" buffer, then exits 3."""
    code = r'''
    plain = ctypes.CDLL(CRASHERS_PATH)
    import mmap
    buf = mmap.mmap(-1, 4096)
    buf[0] = ord("k")
    plain.ffg_install_reader_handler(ctypes.c_size_t(ctypes.addressof(ctypes.c_char.from_buffer(buf))))
    import ffiguard
    ffiguard.shield(buf, access="none")
    ctypes.string_at(0)           # not a guarded call: passed on
    '''
    rc, out, err = run_python(code)
    assert (rc, out) == (3, "=k\n"), (rc, out, err)


def test_doctor_says_which_mechanism():
    from ffiguard.__main__ import doctor_lines

    lines = [line for line in doctor_lines() if line.startswith("shield:")]
    assert lines == ["shield:          " + mechanism()[1]]
    if PKEYS:
        assert lines[0].startswith("shield:          protection keys: pkey_alloc works")
    else:
        assert lines[0].startswith("shield:          mprotect fallback: ")
