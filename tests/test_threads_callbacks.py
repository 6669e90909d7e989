"""Faults on many threads at once, stack overflow off the main thread, and nested
foreign -> Python callback -> foreign calls."""
import signal
import sys
import threading

import pytest

import ffiguard
from conftest import (CALLBACK, CRASHERS_PATH, DIVISION_TRAPS, FPE_CODE_NAME, ILL_CODE_NAME,
                      expected_access, pc_in, run_together, setup_signatures,
                      stack_guard_code)


# ---------------------------------------------------------------- concurrency


def test_concurrent_faults_each_thread_gets_its_own(crashers):
    n_threads, rounds = 16, 150
    before = ffiguard.stats()["recovered"]

    def work(i):
        # Each library object is private to its thread; the functions are the same.
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        for r in range(rounds):
            # Unique unmapped address per (thread, round): below mmap_min_addr.
            addr = 0x100 + (i * rounds + r) * 4
            kind = (i + r) % 4
            if kind == 0:
                try:
                    lib.ffg_read_at(addr)
                except ffiguard.SegmentationFault as e:
                    assert type(e) is ffiguard.SegmentationFault
                    assert (e.address, e.access, e.function) == (
                        addr, expected_access("read"), "ffg_read_at")
                    assert pc_in(e.pc, "ffg_read_at")
                else:
                    raise AssertionError("no fault")
            elif kind == 1:
                try:
                    lib.ffg_write_at(addr, r)
                except ffiguard.SegmentationFault as e:
                    assert (e.address, e.access, e.function) == (
                        addr, expected_access("write"), "ffg_write_at")
                else:
                    raise AssertionError("no fault")
            elif kind == 2:
                # x86-64: divide by zero; AArch64 (division never traps): raise(SIGFPE)
                fn, args = (lib.ffg_divide, (r, 0)) if DIVISION_TRAPS else (lib.ffg_raise, (signal.SIGFPE,))
                try:
                    fn(*args)
                except ffiguard.ArithmeticFault as e:
                    assert (e.signal, e.code_name, e.function) == (
                        signal.SIGFPE, FPE_CODE_NAME, fn.__name__)
                    if DIVISION_TRAPS:
                        assert pc_in(e.pc, "ffg_divide")
                else:
                    raise AssertionError("no fault")
            else:
                try:
                    lib.ffg_illegal_instruction()
                except ffiguard.IllegalInstruction as e:
                    assert (e.signal, e.code_name) == (signal.SIGILL, ILL_CODE_NAME)
                    assert e.function == "ffg_illegal_instruction"
                else:
                    raise AssertionError("no fault")
            assert lib.ffg_add(i, r) == i + r

    run_together(n_threads, work, join_timeout=60)
    assert ffiguard.stats()["recovered"] - before == n_threads * rounds


def test_concurrent_aborts(crashers):
    def work(i):
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        for _ in range(50):
            with pytest.raises(ffiguard.ForeignAbort) as info:
                lib.ffg_abort()
            assert info.value.signal == signal.SIGABRT
            assert info.value.function == "ffg_abort"
            assert info.value.address is None

    run_together(8, work, join_timeout=60)


def test_concurrent_nested_callbacks(crashers):
    """Each thread: foreign -> Python callback -> guarded foreign call that faults."""
    def work(i):
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        caught = []

        @CALLBACK
        def cb(x):
            try:
                lib.ffg_read_at(x)
            except ffiguard.SegmentationFault as e:
                caught.append(e)
                return x // 4
            return -1

        for r in range(50):
            addr = 0x1000 + (i * 50 + r) * 4
            assert lib.ffg_call_callback(cb, addr) == addr // 4 + 1
            assert caught[-1].address == addr
            assert caught[-1].function == "ffg_read_at"
        assert len(caught) == 50

    run_together(8, work, join_timeout=60)


# ---------------------------------------------------------------- stack overflow


@pytest.mark.parametrize("stack_size", [0, 512 * 1024])
def test_stack_overflow_on_other_thread(stack_size):
    results = []

    def body():
        # The thread's first guarded call overflows: its alternate stack must
        # already be in place.
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        for _ in range(3):
            try:
                lib.ffg_recurse(0)
            except ffiguard.ForeignFault as e:
                results.append((e, stack_guard_code(e.address)))
        results.append(lib.ffg_add(1, 2))

    old = threading.stack_size(stack_size)
    try:
        t = threading.Thread(target=body)
        t.start()
    finally:
        threading.stack_size(old)
    t.join(60)
    assert not t.is_alive()
    assert len(results) == 4, results
    for e, guard_code in results[:3]:
        assert type(e) is ffiguard.ForeignStackOverflow
        assert e.signal == signal.SIGSEGV
        # the thread stack's guard: ACCERR for a guard page of its own (glibc <= 2.42),
        # MAPERR for glibc 2.43's guard region inside the stack mapping (conftest)
        assert e.code_name == guard_code
        assert e.function == "ffg_recurse"
        assert e.symbol == "ffg_recurse"
        assert pc_in(e.pc, "ffg_recurse")
    assert results[3] == 3


def test_stack_overflow_on_many_threads_at_once():
    def work(i):
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        with pytest.raises(ffiguard.ForeignStackOverflow) as info:
            lib.ffg_recurse(i)
        assert info.value.code_name == stack_guard_code(info.value.address)  # see above
        assert lib.ffg_add(i, 1) == i + 1

    run_together(6, work, join_timeout=60)


# ---------------------------------------------------------------- nested callbacks


def test_fault_in_nested_call_is_raised_in_callback(crashers):
    caught = []

    @CALLBACK
    def cb(x):
        try:
            crashers.ffg_read_at(x)
        except ffiguard.SegmentationFault as e:
            caught.append(e)
            return 100
        return -1

    before = ffiguard.stats()["recovered"]
    assert crashers.ffg_call_callback(cb, 0x50) == 101
    assert ffiguard.stats()["recovered"] - before == 1
    (e,) = caught
    assert e.address == 0x50
    assert e.function == "ffg_read_at"
    assert e.symbol == "ffg_read_at"
    assert e.access == expected_access("read")
    # The outer call is healthy afterwards.
    assert crashers.ffg_call_callback(CALLBACK(lambda x: x), 7) == 8


def test_fault_in_doubly_nested_call(crashers):
    caught = []

    @CALLBACK
    def inner_cb(x):
        try:
            if DIVISION_TRAPS:
                crashers.ffg_divide(x, 0)
            else:  # AArch64: division never traps; the library raises SIGFPE itself
                crashers.ffg_raise(signal.SIGFPE)
        except ffiguard.ArithmeticFault as e:
            caught.append(e)
            return x * 2
        return -1

    @CALLBACK
    def outer_cb(x):
        return crashers.ffg_call_callback(inner_cb, x)  # guarded, nested

    # outer: cb(x)+1, where cb(x) = inner: inner_cb(x)+1 = 2x+1
    assert crashers.ffg_call_callback(outer_cb, 10) == 22
    (e,) = caught
    assert e.function == ("ffg_divide" if DIVISION_TRAPS else "ffg_raise")
    assert e.code_name == FPE_CODE_NAME


def test_uncaught_fault_in_callback_stays_in_callback(crashers, monkeypatch):
    """ctypes reports an exception escaping a callback as unraisable (and returns an
    unspecified value): the fault belongs to the inner call, the outer call returns."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    @CALLBACK
    def cb(x):
        crashers.ffg_read_at(x)
        return 5

    crashers.ffg_call_callback(cb, 0x60)  # must not raise: the fault was the inner call's
    assert len(unraisable) == 1
    exc = unraisable[0].exc_value
    assert type(exc) is ffiguard.SegmentationFault
    assert exc.address == 0x60
    assert exc.function == "ffg_read_at"
    assert crashers.ffg_add(2, 2) == 4


def test_outer_fault_after_successful_nested_calls(crashers):
    calls = []

    @CALLBACK
    def cb(x):
        calls.append(crashers.ffg_add(x, 1))
        return x

    assert crashers.ffg_call_callback(cb, 3) == 4
    with pytest.raises(ffiguard.SegmentationFault) as info:
        crashers.ffg_call_callback(CALLBACK(), 1)  # NULL callback
    assert info.value.function == "ffg_call_callback"
    assert info.value.pc == 0
    assert calls == [4]


@pytest.mark.parametrize("crash", ["ctypes.string_at(0)", "faulthandler._sigsegv()"])
@pytest.mark.parametrize("where", ["main", "thread"])
def test_fault_in_python_part_of_callback_is_not_recovered(run_python, crash, where):
    rc, out, err = run_python(f"""
        import faulthandler, threading
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        try:
            lib.ffg_read_null()              # the handlers are installed and work
        except ffiguard.SegmentationFault:
            print("guarded ok", flush=True)

        @CALLBACK
        def cb(x):
            print("in callback", flush=True)
            {crash}                         # Python's own code faults, not foreign code
            print("survived", flush=True)
            return 0

        def go():
            try:
                lib.ffg_call_callback(cb, 1)
            except ffiguard.ForeignFault as e:
                print("recovered:", e, flush=True)
            print("after", flush=True)

        if {where!r} == "main":
            go()
        else:
            t = threading.Thread(target=go)
            t.start()
            t.join()
        print("end", flush=True)
    """)
    assert out == "guarded ok\nin callback\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)
