"""Each kind of fault inside a guarded call becomes the right exception, with the
right signal, si_code, address, access, pc and symbolization."""
import ctypes
import os
import pickle
import re
import signal
import struct

import pytest

import ffiguard
from conftest import (AARCH64, ARG0_REG, CRASHERS_PATH, DIVISION_TRAPS, ENTRY_PAD, FPE_CODE_NAME,
                      ILL_CODE, ILL_CODE_NAME, INITIAL_MASK, PC_REG, SP_REG, UNDER_QEMU,
                      expected_access, fpe_call, map_base, pc_in, return_address_in,
                      same_file)

FAULT_CLASSES = [
    ffiguard.SegmentationFault,
    ffiguard.BusError,
    ffiguard.IllegalInstruction,
    ffiguard.ArithmeticFault,
    ffiguard.ForeignAbort,
    ffiguard.ForeignStackOverflow,
]

ATTRIBUTES = ("signal", "code", "code_name", "address", "pc", "function", "library",
              "symbol", "frames", "access", "registers")


def catch(fn, *args, cls=ffiguard.ForeignFault):
    with pytest.raises(cls) as info:
        fn(*args)
    return info.value


def check_common(e, signum, code_name, function):
    """Invariants that hold for every fault report."""
    assert e.signal == signum
    assert isinstance(e.signal, signal.Signals)
    assert e.code_name == code_name
    assert isinstance(e.code, int)
    assert e.function == function
    assert isinstance(e.pc, int)
    assert isinstance(e.frames, list) and e.frames, e.frames
    assert all(isinstance(f, int) for f in e.frames)
    assert e.frames[0] == e.pc
    assert isinstance(e.registers, dict) and e.registers
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in e.registers.items())
    assert e.pc in e.registers.values()
    msg = str(e)
    assert "\n" not in msg
    assert msg.startswith(f"{signum.name} ({code_name}"), msg
    assert msg.endswith(f"during call to {function}"), msg


def verb(kind):
    """How the message words an access of `kind` (see conftest.expected_access)."""
    return {"read": "reading", "write": "writing"}.get(expected_access(kind), "at")


def check_in_crashers(e, symbol):
    """pc lies in `symbol` of the crashers library, and the report says so."""
    assert pc_in(e.pc, symbol), (hex(e.pc), symbol)
    assert e.symbol == symbol
    assert e.library is not None and same_file(e.library, CRASHERS_PATH), e.library
    base = map_base(CRASHERS_PATH)
    offset = e.pc - base
    # "... in ffg_read_at (_crashers.cpython-311-x86_64-linux-gnu.so+0x1179) ..."
    where = f"in {symbol} ({os.path.basename(e.library)}+{offset:#x})"
    assert where in str(e), (where, str(e))


# ---------------------------------------------------------------- class hierarchy


def test_hierarchy():
    assert issubclass(ffiguard.ForeignFault, Exception)
    assert not issubclass(ffiguard.ForeignFault, OSError)
    for cls in FAULT_CLASSES:
        assert issubclass(cls, ffiguard.ForeignFault)
        assert not issubclass(cls, OSError)
    assert issubclass(ffiguard.ForeignStackOverflow, ffiguard.SegmentationFault)
    distinct = FAULT_CLASSES[:5]
    for a in distinct:
        for b in distinct:
            assert issubclass(a, b) == (a is b)


def test_fault_is_not_swallowed_by_except_oserror(crashers):
    with pytest.raises(ffiguard.SegmentationFault):
        try:
            crashers.ffg_read_null()
        except OSError:  # around file I/O, must not swallow a crash
            pytest.fail("a ForeignFault was caught by `except OSError`")


# ---------------------------------------------------------------- SIGSEGV


def test_read_null(crashers):
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_read_null")
    assert e.code == 1  # SEGV_MAPERR
    assert e.address == 0
    assert e.access == expected_access("read")
    check_in_crashers(e, "ffg_read_at")
    assert re.fullmatch(
        r"SIGSEGV \(SEGV_MAPERR: [^)]+\) " + verb("read") + r" 0x0 in ffg_read_at "
        r"\([^ ]+\+0x[0-9a-f]+\) during call to ffg_read_null", str(e)), str(e)


def test_read_null_backtrace_has_caller(crashers):
    # ffg_read_null calls ffg_read_at (a leaf without a frame of its own): the
    # native backtrace is ffg_read_at <- ffg_read_null <- ...
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    assert pc_in(e.frames[0], "ffg_read_at")
    assert len(e.frames) >= 2
    assert return_address_in(e.frames[1], "ffg_read_null"), [hex(f) for f in e.frames]


@pytest.mark.parametrize("address", [0x10, 0x1234, 0xFFF8, 0xDEAD0000])
def test_read_at_unmapped_address(crashers, address):
    e = catch(crashers.ffg_read_at, address, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_read_at")
    assert e.address == address
    assert e.access == expected_access("read")
    check_in_crashers(e, "ffg_read_at")
    assert f"{verb('read')} {address:#x} in ffg_read_at" in str(e)
    assert e.registers[PC_REG] == e.pc
    assert e.registers[ARG0_REG] == address  # the argument register at the fault


def test_write_null(crashers):
    e = catch(crashers.ffg_write_null, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_write_null")
    assert e.address == 0
    assert e.access == expected_access("write")
    check_in_crashers(e, "ffg_write_at")
    assert re.fullmatch(
        r"SIGSEGV \(SEGV_MAPERR: [^)]+\) " + verb("write") + r" 0x0 in ffg_write_at "
        r"\([^ ]+\+0x[0-9a-f]+\) during call to ffg_write_null", str(e)), str(e)


def test_write_readonly_page(crashers, plain):
    page = plain.ffg_readonly_page()
    assert page  # mmap worked
    assert crashers.ffg_readonly_page() == page
    e = catch(crashers.ffg_write_at, page, 7, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SEGV_ACCERR", "ffg_write_at")
    assert e.code == 2  # SEGV_ACCERR
    assert e.address == page
    assert e.access == expected_access("write")
    check_in_crashers(e, "ffg_write_at")
    assert f"{verb('write')} {page:#x} in ffg_write_at" in str(e)
    # Reading the same page works: it is mapped, just not writable.
    assert crashers.ffg_read_at(page) == 0


def test_call_null(crashers):
    e = catch(crashers.ffg_call_null, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_call_null")
    assert e.address == 0
    assert e.pc == 0
    # Known on every architecture: a fetch fault's address is the pc itself (AArch64
    # without an ESR record, e.g. under qemu, recognises it that way).
    assert e.access == "execute"
    assert e.symbol is None
    assert e.library is None
    # The unwinder knows nothing of pc 0; the caller comes from where the call left its
    # return address (x86-64: the top of the stack; AArch64: x30).
    assert len(e.frames) >= 2 and return_address_in(e.frames[1], "ffg_call_null"), \
        [hex(f) for f in e.frames]


def test_raised_sigsegv_has_no_address(crashers):
    e = catch(crashers.ffg_raise, signal.SIGSEGV, cls=ffiguard.SegmentationFault)
    assert type(e) is ffiguard.SegmentationFault
    check_common(e, signal.SIGSEGV, "SI_TKILL", "ffg_raise")
    assert e.code == -6  # SI_TKILL
    assert e.address is None
    assert e.access is None


# ---------------------------------------------------------------- SIGBUS


def test_bus_error_past_eof(crashers, one_byte_fd):
    where = ctypes.c_size_t(0)
    e = catch(crashers.ffg_read_past_eof, one_byte_fd, ctypes.byref(where),
              cls=ffiguard.BusError)
    assert type(e) is ffiguard.BusError
    check_common(e, signal.SIGBUS, "BUS_ADRERR", "ffg_read_past_eof")
    assert e.code == 2  # BUS_ADRERR
    assert where.value != 0
    assert e.address == where.value
    assert e.access == expected_access("read")
    check_in_crashers(e, "ffg_read_past_eof")
    assert f"{where.value:#x}" in str(e)


# ---------------------------------------------------------------- SIGILL


def test_illegal_instruction(crashers):
    e = catch(crashers.ffg_illegal_instruction, cls=ffiguard.IllegalInstruction)
    assert type(e) is ffiguard.IllegalInstruction
    # x86-64 ud2: ILL_ILLOPN. AArch64 udf: ILL_ILLOPC on Linux, ILL_ILLOPN under qemu-user
    # (see conftest.ILL_CODE_NAME).
    check_common(e, signal.SIGILL, ILL_CODE_NAME, "ffg_illegal_instruction")
    assert e.code == ILL_CODE
    # ud2 / udf is the first instruction of the function (after the BTI landing pad).
    start = ctypes.cast(ctypes.CDLL(CRASHERS_PATH).ffg_illegal_instruction,
                        ctypes.c_void_p).value
    assert e.pc == start + ENTRY_PAD
    assert e.address == e.pc  # si_addr of SIGILL is the faulting instruction
    check_in_crashers(e, "ffg_illegal_instruction")


# ---------------------------------------------------------------- SIGFPE


@pytest.mark.parametrize("a, b", [(1, 0), (-(2 ** 31), -1)])
def test_divide(crashers, a, b):
    if not DIVISION_TRAPS:
        # AArch64: sdiv by zero gives 0 and INT_MIN / -1 gives INT_MIN, no trap; the
        # SIGFPE case there is test_raised_fpe (code raising SIGFPE itself).
        assert crashers.ffg_divide(a, b) == (0 if b == 0 else a)
        assert crashers.ffg_divide(7, 2) == 3
        return
    e = catch(crashers.ffg_divide, a, b, cls=ffiguard.ArithmeticFault)
    assert type(e) is ffiguard.ArithmeticFault
    check_common(e, signal.SIGFPE, "FPE_INTDIV", "ffg_divide")
    assert e.code == 1  # FPE_INTDIV
    assert e.address == e.pc  # si_addr of SIGFPE is the faulting instruction
    assert e.access is None
    check_in_crashers(e, "ffg_divide")
    assert crashers.ffg_divide(7, 2) == 3


def test_raised_fpe(crashers):
    """SIGFPE raised by the foreign code itself (what a runtime checking for division
    by zero does on AArch64, where the division never traps): same class, SI_TKILL."""
    e = catch(crashers.ffg_raise, signal.SIGFPE, cls=ffiguard.ArithmeticFault)
    assert type(e) is ffiguard.ArithmeticFault
    check_common(e, signal.SIGFPE, "SI_TKILL", "ffg_raise")
    assert e.code == -6
    assert e.address is None and e.access is None
    assert any(return_address_in(f, "ffg_raise") for f in e.frames), [hex(f) for f in e.frames]
    fn, args = fpe_call(crashers)  # the SIGFPE case the other tests use here
    e = catch(fn, *args, cls=ffiguard.ArithmeticFault)
    assert e.code_name == FPE_CODE_NAME


def test_access_kind_source():
    """Where read/write comes from: x86-64's page-fault error code is always there;
    AArch64's ESR record is there on Linux, never under qemu-user."""
    lib = ffiguard.CDLL(CRASHERS_PATH)
    with pytest.raises(ffiguard.SegmentationFault):
        lib.ffg_write_null()
    assert ffiguard._core.access_in_context() is (not UNDER_QEMU)
    assert ffiguard._core.ARCH == ("aarch64" if AARCH64 else "x86_64")


# ---------------------------------------------------------------- SIGABRT


def check_abort(e, function):
    assert type(e) is ffiguard.ForeignAbort
    check_common(e, signal.SIGABRT, "SI_TKILL", function)
    assert e.code == -6  # SI_TKILL: abort() raises with tgkill
    assert e.address is None
    assert e.access is None
    # abort() raises from inside libc.
    assert e.library is not None and os.path.basename(e.library).startswith("libc"), e.library


def test_abort(crashers):
    e = catch(crashers.ffg_abort, cls=ffiguard.ForeignAbort)
    check_abort(e, "ffg_abort")


def test_abort_backtrace_reaches_caller(crashers):
    e = catch(crashers.ffg_abort, cls=ffiguard.ForeignAbort)
    assert any(return_address_in(f, "ffg_abort") for f in e.frames), \
        [hex(f) for f in e.frames]


def test_failed_assert(crashers, capfd):
    assert crashers.ffg_assert_positive(5) == 5
    e = catch(crashers.ffg_assert_positive, 0, cls=ffiguard.ForeignAbort)
    check_abort(e, "ffg_assert_positive")
    err = capfd.readouterr().err
    assert "Assertion `x > 0' failed" in err


@pytest.mark.parametrize("signum, cls", [
    (signal.SIGSEGV, ffiguard.SegmentationFault),
    (signal.SIGBUS, ffiguard.BusError),
    (signal.SIGILL, ffiguard.IllegalInstruction),
    (signal.SIGFPE, ffiguard.ArithmeticFault),
    (signal.SIGABRT, ffiguard.ForeignAbort),
])
def test_raised_signal_maps_to_class(crashers, signum, cls):
    e = catch(crashers.ffg_raise, signum, cls=cls)
    assert type(e) is cls
    assert e.signal == signum
    assert e.code_name == "SI_TKILL"
    assert e.address is None
    assert e.function == "ffg_raise"


# ---------------------------------------------------------------- stack overflow


def test_stack_overflow_main_thread(crashers):
    for _ in range(3):  # the alternate stack is reusable
        e = catch(crashers.ffg_recurse, 0, cls=ffiguard.ForeignStackOverflow)
        assert type(e) is ffiguard.ForeignStackOverflow
        assert isinstance(e, ffiguard.SegmentationFault)
        # Past the main thread's stack nothing is mapped (SEGV_MAPERR); qemu-user puts a
        # PROT_NONE guard page below the stack it emulates (SEGV_ACCERR).
        check_common(e, signal.SIGSEGV, "SEGV_ACCERR" if UNDER_QEMU else "SEGV_MAPERR", "ffg_recurse")
        check_in_crashers(e, "ffg_recurse")
        # The fault is at the stack pointer's end of the stack.
        assert e.address is not None and abs(e.address - e.registers[SP_REG]) <= 4096
        # The backtrace is made of ffg_recurse frames.
        assert len(e.frames) >= 2
        assert all(return_address_in(f, "ffg_recurse") for f in e.frames[1:])
    assert crashers.ffg_add(2, 3) == 5


# ---------------------------------------------------------------- pickling


def _faults(crashers, one_byte_fd):
    where = ctypes.c_size_t()
    calls = [
        (crashers.ffg_read_null,),
        (crashers.ffg_write_null,),
        (crashers.ffg_call_null,),
        (crashers.ffg_read_past_eof, one_byte_fd, ctypes.byref(where)),
        (crashers.ffg_illegal_instruction,),
        (fpe_call(crashers)[0], *fpe_call(crashers)[1]),
        (crashers.ffg_abort,),
        (crashers.ffg_recurse, 0),
    ]
    out = []
    for fn, *args in calls:
        try:
            fn(*args)
        except ffiguard.ForeignFault as e:
            out.append(e)
        else:
            pytest.fail(f"{fn.__name__} did not fault")
    return out


def test_pickle_round_trip_keeps_every_attribute(crashers, one_byte_fd):
    faults = _faults(crashers, one_byte_fd)
    assert [type(e) for e in faults] == [
        ffiguard.SegmentationFault, ffiguard.SegmentationFault,
        ffiguard.SegmentationFault, ffiguard.BusError, ffiguard.IllegalInstruction,
        ffiguard.ArithmeticFault, ffiguard.ForeignAbort, ffiguard.ForeignStackOverflow]
    for e in faults:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            c = pickle.loads(pickle.dumps(e, protocol=proto))
            assert type(c) is type(e)
            for name in ATTRIBUTES:
                assert getattr(c, name) == getattr(e, name), (name, proto)
                assert type(getattr(c, name)) is type(getattr(e, name)), (name, proto)
            assert isinstance(c.signal, signal.Signals)
            assert str(c) == str(e)
            assert c.args == e.args


# ---------------------------------------------------------------- recovery & stats


def test_stats_count_each_recovered_fault(crashers):
    before = ffiguard.stats()
    assert isinstance(before["recovered"], int)
    for fn, args in [(crashers.ffg_read_null, ()), (crashers.ffg_write_null, ()),
                     fpe_call(crashers), (crashers.ffg_abort, ()),
                     (crashers.ffg_illegal_instruction, ())]:
        with pytest.raises(ffiguard.ForeignFault):
            fn(*args)
    crashers.ffg_add(1, 2)  # a good call is not counted
    after = ffiguard.stats()
    assert after["recovered"] - before["recovered"] == 5
    b, a = before["by_signal"], after["by_signal"]
    assert a.get("SIGSEGV", 0) - b.get("SIGSEGV", 0) == 2
    assert a.get("SIGFPE", 0) - b.get("SIGFPE", 0) == 1
    assert a.get("SIGABRT", 0) - b.get("SIGABRT", 0) == 1
    assert a.get("SIGILL", 0) - b.get("SIGILL", 0) == 1
    assert a.get("SIGBUS", 0) - b.get("SIGBUS", 0) == 0


def test_mask_and_calls_fine_after_each_fault(crashers, one_byte_fd):
    for e in _faults(crashers, one_byte_fd):
        assert isinstance(e, ffiguard.ForeignFault)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == INITIAL_MASK, e
    for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        assert s not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert crashers.ffg_add(40, 2) == 42


def test_mixed_faults_in_a_row(crashers):
    for i in range(200):
        addr = 0x100 + 8 * i
        e = catch(crashers.ffg_read_at, addr, cls=ffiguard.SegmentationFault)
        assert e.address == addr
        fn, args = (crashers.ffg_divide, (i, 0)) if DIVISION_TRAPS else fpe_call(crashers)
        e = catch(fn, *args, cls=ffiguard.ArithmeticFault)
        assert e.code_name == FPE_CODE_NAME
        assert crashers.ffg_add(i, 1) == i + 1


def test_no_fault_no_exception(crashers):
    assert crashers.ffg_add(2, 3) == 5
    assert crashers.ffg_noop() is None
    buf = ctypes.c_int(-77)
    assert crashers.ffg_read_at(ctypes.addressof(buf)) == -77


def test_pickled_fault_unpickles_in_another_process(crashers, run_python):
    """The pickle carries the report itself: a process that never loaded the library
    (or ffiguard's crashers) gets the same attributes and message."""
    try:
        crashers.ffg_read_null()
    except ffiguard.SegmentationFault as e:
        exc = e
    data = pickle.dumps(exc)
    rc, out, err = run_python(f"""
        import pickle
        e = pickle.loads({data!r})
        print(repr((type(e).__name__, e.signal, e.code, e.code_name, e.address, e.pc,
                    e.function, e.library, e.symbol, e.frames, e.access,
                    sorted(e.registers.items()), str(e))))
    """)
    assert rc == 0, err
    want = (type(exc).__name__, exc.signal, exc.code, exc.code_name, exc.address, exc.pc,
            exc.function, exc.library, exc.symbol, exc.frames, exc.access,
            sorted(exc.registers.items()), str(exc))
    assert out.strip() == repr(want)


def test_report_survives_unloading_the_library(run_python):
    """The report describes the moment of the fault: unloading the library before
    anyone reads the exception must not change (or lose) where the fault was."""
    rc, out, err = run_python("""
        import _ctypes, gc
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault as e:
            exc = e
        handle = lib._handle
        del lib
        gc.collect()
        _ctypes.dlclose(handle)
        with open("/proc/self/maps") as f:
            assert not any(CRASHERS_PATH in line for line in f), "still mapped"
        print(exc.symbol)
        print(os.path.realpath(exc.library or "") == os.path.realpath(CRASHERS_PATH))
        print(exc)
    """)
    assert rc == 0, err
    symbol, same, message = out.splitlines()
    assert symbol == "ffg_read_at"
    assert same == "True"
    assert " in ffg_read_at (" in message, message


# ---------------------------------------------------------------- AArch64 signal frames


def _record(magic, payload=b"", size=None):
    """One signal-frame record: {u32 magic, u32 size}, payload, padded to 16 bytes."""
    body = payload + b"\0" * (-(8 + len(payload)) % 16)
    return struct.pack("<II", magic, size if size is not None else 8 + len(body)) + body


FPSIMD, ESR, EXTRA, SVE = 0x46508001, 0x45535201, 0x45585401, 0x53564501


def _esr(ec, wnr=0):
    return _record(ESR, struct.pack("<Q", ec << 26 | wnr << 6))


def test_access_from_aarch64_signal_frame_records():
    """AArch64's access kind comes from the ESR record in the signal frame, found by
    walking the records by their headers and following EXTRA_MAGIC. qemu-user writes
    none (every fault test there sees None), so the walk and the decoding are tested on
    synthetic frames; x86-64 reads the page-fault error code instead, which every fault
    test above checks."""
    if not AARCH64:
        pytest.skip("AArch64 signal-frame records; x86-64's error code: the tests above")
    decode = ffiguard._core._decode_access
    fpsimd = _record(FPSIMD, b"\0" * 520)  # fpsr, fpcr, 32 x 128-bit vregs
    end = _record(0, size=0)[:8] + b"\0" * 8
    pc = 0x400000
    assert decode(fpsimd + _esr(0x24) + end, pc, 0x10) == ("read", True)  # data abort
    assert decode(fpsimd + _esr(0x24, wnr=1) + end, pc, 0x10) == ("write", True)
    assert decode(fpsimd + _esr(0x20) + end, pc, pc) == ("execute", True)  # instruction abort
    assert decode(fpsimd + _esr(0x22) + end, pc, 0x10) == (None, True)  # pc alignment
    # No ESR record (qemu-user): unknown, except a fetch (the address is the pc).
    assert decode(fpsimd + end, pc, 0x10) == (None, False)
    assert decode(fpsimd + end, pc, pc) == ("execute", False)
    # Records after one the walker does not know (an SVE record) are still found.
    sve = _record(SVE, b"\0" * 24)
    assert decode(fpsimd + sve + _esr(0x24, wnr=1) + end, pc, 0x10) == ("write", True)
    # The ESR record in the extra space an EXTRA_MAGIC record points to.
    extra_space = ctypes.create_string_buffer(sve + _esr(0x24, wnr=1) + end, 256)
    extra = _record(EXTRA, struct.pack("<QI12x", ctypes.addressof(extra_space), 256))
    assert decode(fpsimd + extra + end, pc, 0x10) == ("write", True)
    # A malformed size stops the walk instead of wandering off.
    assert decode(fpsimd + _record(SVE, b"", size=12) + _esr(0x24) + end, pc, 0x10) == (None, False)
    assert decode(fpsimd + _record(SVE, b"", size=1 << 20) + end, pc, 0x10) == (None, False)
