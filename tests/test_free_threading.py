"""Threads without a GIL: on free-threaded CPython (3.13t+, run with PYTHON_GIL=0 or with
the GIL left off because every module declares it needs none) nothing serialises
ffiguard's own structures but ffiguard. These tests run on every interpreter (with a
GIL they check the same results); their point is the free-threaded one, where they are
run repeatedly (see docs/design.md, "Free-threaded CPython"). Isolate mode is tested
separately (test_isolate*.py)."""
import ctypes
import ctypes.util
import os
import subprocess
import sys
import sysconfig
import textwrap
import threading

import pytest

import ffiguard
from ffiguard import _core
from conftest import CRASHERS_PATH, run_together, setup_signatures

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
THREADS = 4
LIBC = ctypes.util.find_library("c")


@pytest.mark.skipif(not FREE_THREADED, reason="the GIL check of a free-threaded build")
def test_import_keeps_the_gil_off():
    # _core declares Py_mod_gil: importing ffiguard, guarding and faulting must not turn
    # the GIL back on (with PYTHON_GIL unset, an extension that does not declare it
    # does so, with a RuntimeWarning: made an error here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("error")
        import ffiguard
        lib = ffiguard.CDLL(ffiguard.crashers_path())
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault:
            pass
        print("gil", sys._is_gil_enabled())
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gil", "False"], out.stdout + out.stderr


def test_stub_allocation_from_many_threads():
    # Each thread makes stubs for its own (never called) targets; every stub must be
    # new, and lead to its own target. Without the lock in ffg_stub_new, free-threaded
    # runs handed out the same stub twice, some pointing at another thread's target.
    per_thread = 20000
    base = 0x10000000
    targets = [[base + (i * per_thread + k) * 16 for k in range(per_thread)]
               for i in range(THREADS)]
    made = [None] * THREADS

    def make(i):
        stub = _core.stub
        made[i] = [(t, stub(t)) for t in targets[i]]

    run_together(THREADS, make)
    stubs = [s for row in made for _, s in row]
    assert len(set(stubs)) == len(stubs)
    for row in made:
        for target, stub in row:
            assert _core.stub_target(stub) == target


def test_guard_call_fault_from_many_threads():
    # Several threads at once: load the library afresh (new ctypes function objects to
    # retarget), guard fresh function objects of libc, make new stubs, call, fault and
    # read the fault; meanwhile one thread installs/uninstalls guard-everything and
    # re-selects the signals. Every call must reach its own function, and every fault
    # must be caught and attributed to the call that made it.
    rounds = 60
    stop = threading.Event()

    def worker(i):
        for k in range(rounds):
            lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
            assert lib.ffg_add(i, k) == i + k
            with pytest.raises(ffiguard.SegmentationFault) as info:
                lib.ffg_read_null()
            e = info.value
            assert (e.function, e.address, e.code_name) == ("ffg_read_null", 0, "SEGV_MAPERR")
            assert e.symbol is not None and e.symbol.startswith("ffg_read")
            with pytest.raises(ffiguard.ForeignAbort):
                lib.ffg_abort()
            # a fresh ctypes function object of another library each round
            strlen = ffiguard.guard(ctypes.CDLL(LIBC).strlen)
            strlen.argtypes, strlen.restype = [ctypes.c_char_p], ctypes.c_size_t
            assert strlen(b"x" * (i + k)) == i + k
            if k % 20 == 0:
                assert "ffg_read_null" in e.report()

    def patcher():
        while not stop.is_set():
            with ffiguard.install():
                lib = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
                assert lib.ffg_add(2, 3) == 5
                with pytest.raises(ffiguard.SegmentationFault):
                    lib.ffg_read_null()
            ffiguard.signals.select(ffiguard.signals.ALL)

    def body(i):
        if i == THREADS:
            patcher()
        else:
            try:
                worker(i)
            finally:
                if i == 0:
                    stop.set()

    try:
        run_together(THREADS + 1, body)
    finally:
        stop.set()
    assert not ffiguard.installed()
