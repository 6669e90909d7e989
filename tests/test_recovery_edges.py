"""Recovery at the edges: a fault is recovered only into the guarded call it belongs to,
and leaves the interpreter and the thread exactly as a normal return would.

Each test here reproduces a case where an earlier design recovered into the wrong
frame, lost a fault, or left the thread changed (issue 12, items 1-4 and 10-12).
Tests that expect the process to die run it in a subprocess.
"""
import ctypes
import signal
import sys
import threading

import pytest

import ffiguard
from ffiguard import _core

from conftest import ADDRESS_CALLBACK, CALLBACK, CRASHERS_PATH, setup_signatures

SEGV = signal.SIGSEGV


# ---------------------------------------------------------------- 1: callbacks


UNGUARDED_IN_CALLBACK = """
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))

def cb(x):
    try:
        {fault}
    finally:
        print("finally ran", flush=True)
    return 0

callback = CALLBACK(cb)
print("calling", flush=True)
try:
    lib.ffg_call_callback(callback, 1)
except ffiguard.ForeignFault as e:
    print("recovered into the outer call:", e, flush=True)
"""


@pytest.mark.parametrize("fault", [
    "plain.ffg_read_null()",                      # an unguarded ctypes call (GIL released)
    "plain.ffg_call_callback(CALLBACK(lambda x: plain.ffg_read_at(0x40)), 1)",  # deeper
])
def test_unguarded_fault_inside_a_callback_is_not_the_guarded_calls(run_python, fault):
    """A Python callback running inside a guarded call makes an unguarded foreign call
    that faults: that fault is not the guarded call's. Recovering it would abandon the
    callback's Python frames (its finally never runs). It must go where it would go
    without ffiguard: the default action."""
    rc, out, err = run_python(UNGUARDED_IN_CALLBACK.format(fault=fault))
    assert out == "calling\n", (out, err)
    assert rc == -SEGV, (rc, err)


@pytest.mark.skipif(sys.version_info >= (3, 14), reason=(
    "3.14+ counts C recursion by stack address, not in the thread state: a callback whose "
    "callable is itself a C function (no Python frame) is not told apart there; "
    "docs/design.md, 'The fault path', states this gap"))
def test_unguarded_c_callable_as_the_callback_is_not_the_guarded_calls(run_python):
    """The callback's callable is an unguarded ctypes function object itself: no Python
    frame is pushed, but calling it moved the interpreter's C recursion counter."""
    rc, out, err = run_python("""
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
callback = CALLBACK(plain.ffg_read_at)      # called with 1: reads address 1
print("calling", flush=True)
try:
    lib.ffg_call_callback(callback, 1)
except ffiguard.ForeignFault as e:
    print("recovered into the outer call:", e, flush=True)
""")
    assert out == "calling\n", (out, err)
    assert rc == -SEGV, (rc, err)


def test_guarded_fault_inside_a_callback_is_the_inner_calls(crashers):
    """The same callback making a *guarded* call: the inner call's fault is raised in
    the callback, the outer call goes on and returns normally."""
    seen = []

    def cb(x):
        try:
            crashers.ffg_read_at(0x40)
        except ffiguard.SegmentationFault as e:
            seen.append(e.address)
        return 41

    assert crashers.ffg_call_callback(CALLBACK(cb), 1) == 42
    assert seen == [0x40]
    assert _core.depth() == 0


# ---------------------------------------------------------------- 2: nesting limit


def test_nesting_beyond_the_guard_stack_is_refused(crashers):
    """Guarded calls nested through callbacks: the one that cannot get a guard frame
    raises RecursionError naming the limit before calling (never runs unguarded), and
    everything unwinds normally."""
    limit = _core.MAX_FRAMES
    refused = []

    def cb(x):
        try:
            return crashers.ffg_call_callback(callback, x + 1)
        except RecursionError as e:
            refused.append((x, str(e)))
            return -1

    callback = CALLBACK(cb)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 4 * limit + 100))
    try:
        crashers.ffg_call_callback(callback, 1)
    finally:
        sys.setrecursionlimit(old)
    assert len(refused) == 1, refused
    depth, message = refused[0]
    assert depth == limit, refused       # calls 1..limit got frames; call limit+1 did not
    assert str(limit) in message and "ffg_call_callback" in message, message
    assert _core.depth() == 0
    with pytest.raises(ffiguard.SegmentationFault):
        crashers.ffg_read_null()


# ---------------------------------------------------------------- 3: greenlets


def _greenlet():
    return pytest.importorskip("greenlet", reason="greenlet is not available for this "
                               "interpreter (the test extra installs it where it is)")


OUT_OF_ORDER = """
import greenlet
import ffiguard
from ffiguard import _core
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
log = []

def cb_a(x):              # inside guarded call A, in greenlet a
    gb.switch()           # -> b starts guarded call B
    return 10

def cb_b():               # inside guarded call B, in greenlet b
    ga.switch()           # -> a finishes A while B is still running
    return 0x80           # then B reads address 0x80: B's own fault

def run_a():
    log.append(("A", lib.ffg_call_callback(CALLBACK(cb_a), 1)))
    # A finished under B's live frame: a guarded fault here is a's own,
    try:
        lib.ffg_read_at(0x40)
    except ffiguard.SegmentationFault as e:
        log.append(("a fault", hex(e.address)))
    # and guarded calls nested two deep take new frames, not B's.
    log.append(("C", lib.ffg_call_callback(CALLBACK(lambda x: lib.ffg_add(x, 1)), 5)))
    gb.switch()           # -> B goes on, and faults

def run_b():
    try:
        lib.ffg_call_then_read(ADDRESS_CALLBACK(cb_b))
    except ffiguard.SegmentationFault as e:
        log.append(("b fault", hex(e.address)))

ga, gb = greenlet.greenlet(run_a), greenlet.greenlet(run_b)
ga.switch()
while not gb.dead:
    gb.switch()
print(log, _core.depth(), flush=True)
"""


def test_greenlets_finishing_out_of_order(run_python):
    """Guarded call A (in greenlet a) switches, inside a callback, to greenlet b, which
    starts guarded call B and switches back: A finishes while B still runs. Faults in
    either greenlet afterwards are their own, and the guard stack empties."""
    _greenlet()
    rc, out, err = run_python(OUT_OF_ORDER)
    assert rc == 0, (rc, out, err)
    assert out == ("[('A', 11), ('a fault', '0x40'), ('C', 7), ('b fault', '0x80')] 0\n"), (out, err)


def test_greenlets_leave_no_dead_frame_to_resume(run_python):
    """After calls finished out of order, an unguarded fault is nobody's: it takes the
    default action instead of resuming on a stack that no longer exists."""
    _greenlet()
    rc, out, err = run_python(OUT_OF_ORDER + """
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
print("crashing", flush=True)
plain.ffg_read_null()
print("survived", flush=True)
""")
    assert out.endswith("0\ncrashing\n"), (out, err)
    assert rc == -SEGV, (rc, err)


def test_fault_in_a_greenlet_switched_in_during_a_guarded_call(run_python):
    """Greenlet a is inside a guarded call (suspended in its callback); greenlet b makes
    an unguarded call that faults: not a's call's fault."""
    _greenlet()
    rc, out, err = run_python("""
import greenlet
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))

def cb(x):
    gb.switch()
    return 0

def run_b():
    print("crashing", flush=True)
    plain.ffg_read_null()
    print("survived", flush=True)

gb = greenlet.greenlet(run_b)
try:
    lib.ffg_call_callback(CALLBACK(cb), 1)
except ffiguard.ForeignFault as e:
    print("recovered into a's call:", e, flush=True)
""")
    assert out == "crashing\n", (out, err)
    assert rc == -SEGV, (rc, err)


# ---------------------------------------------------------------- 4: sub-interpreters


# A "legacy" sub-interpreter (shared GIL, single-phase extension modules allowed: what
# mod_wsgi and embedders use); 3.12+ isolated ones refuse ctypes itself.
SUBINTERPRETER = """
try:
    import _interpreters as interpreters          # 3.13+
    def run(code):
        interp = interpreters.create(interpreters.new_config("legacy"))
        try:
            return interpreters.exec(interp, code)
        finally:
            interpreters.destroy(interp)
except ImportError:
    import _xxsubinterpreters as interpreters     # 3.10-3.12
    def run(code):
        try:
            interp = interpreters.create(isolated=False)
        except TypeError:
            interp = interpreters.create()
        try:
            return interpreters.run_string(interp, code)
        finally:
            interpreters.destroy(interp)
"""


def test_recovery_after_a_subinterpreter_existed(run_python):
    """Once any sub-interpreter has been created (even destroyed since), guarded faults
    in the main interpreter are still recovered. ffiguard itself refuses to import in a
    sub-interpreter, with an ImportError that says why."""
    rc, out, err = run_python(SUBINTERPRETER + """
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
run('''
try:
    import ffiguard
except ImportError as e:
    import os
    os.write(1, ("refused: %s\\\\n" % e).encode())
else:
    import os
    os.write(1, b"imported\\\\n")
''')
for i in range(3):
    try:
        lib.ffg_read_at(0x40)
    except ffiguard.SegmentationFault as e:
        print("recovered", hex(e.address), flush=True)
""")
    assert rc == 0, (rc, out, err)
    lines = out.splitlines()
    # ffiguard's own refusal, or (free-threaded builds, whose sub-interpreters check
    # extension modules even in the legacy configuration) the import system's.
    assert lines[0].startswith("refused: ") and ("main interpreter" in lines[0] or
                                                 "does not support loading in subinterpreters"
                                                 in lines[0]), out
    assert lines[1:] == ["recovered 0x40"] * 3, (out, err)


def test_guarded_function_refused_in_a_subinterpreter(run_python):
    """Even with the module's objects reachable there, a GuardedFunction cannot be made
    in a sub-interpreter."""
    rc, out, err = run_python(SUBINTERPRETER + """
import ffiguard
run('''
import os
try:
    import ffiguard._core as core
    core.GuardedFunction(print)
except (ImportError, RuntimeError) as e:
    os.write(1, ("refused: %s\\\\n" % type(e).__name__).encode())
else:
    os.write(1, b"made\\\\n")
''')
""")
    assert rc == 0, (rc, out, err)
    assert out.startswith("refused: "), (out, err)


# ---------------------------------------------------------------- 10: who sent it


WATCHDOG = """
import threading, time
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
libc = ffiguard.CDLL(None)
libc.usleep.argtypes = [ctypes.c_uint]
main = threading.get_ident()

def watchdog():
    time.sleep(0.3)
    signal.pthread_kill(main, signal.SIGABRT)

threading.Thread(target=watchdog, daemon=True).start()
print("waiting", flush=True)
try:
    {call}
except ffiguard.ForeignFault as e:
    print("taken for the foreign code's:", type(e).__name__, flush=True)
"""


@pytest.mark.parametrize("call", ["lib.ffg_spin_ms(5000)", "libc.usleep(5000000)"])
def test_abort_sent_by_another_thread_is_not_the_foreign_codes(run_python, call):
    """A watchdog thread's pthread_kill(SIGABRT) while the main thread is in a guarded
    call (spinning, or blocked in a system call) asks for a core dump: the process dies
    of SIGABRT as without ffiguard."""
    rc, out, err = run_python(WATCHDOG.format(call=call), timeout=60)
    assert out == "waiting\n", (out, err)
    assert rc == -signal.SIGABRT, (rc, err)


@pytest.mark.parametrize("signum", [signal.SIGABRT, signal.SIGSEGV, signal.SIGFPE])
def test_signal_the_foreign_code_raises_itself_is_recovered(crashers, signum):
    with pytest.raises(ffiguard.ForeignFault) as info:
        crashers.ffg_raise(signum)
    assert info.value.signal == signum
    assert info.value.code_name == "SI_TKILL"


# ---------------------------------------------------------------- 11: signal mask


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGABRT, signal.SIGBUS, signal.SIGUSR2])
def test_mask_after_recovery_is_the_mask_at_the_call(crashers, signum):
    """The foreign code blocked a signal before faulting; after recovery the thread has
    the mask it had when the guarded call started: Ctrl-C keeps working."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(ffiguard.SegmentationFault):
        crashers.ffg_block_and_fault(signum)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_mask_the_program_set_is_kept(crashers):
    """A mask the program set itself (signal.pthread_sigmask) is the one kept, on a
    thread whose first guarded call came before it."""
    result = {}

    def body():
        crashers.ffg_noop()                     # the thread's guard state exists now
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        expected = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            crashers.ffg_block_and_fault(signal.SIGINT)
        except ffiguard.SegmentationFault:
            pass
        result["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        result["expected"] = expected

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert signal.SIGUSR1 in result["expected"]
    assert result["mask"] == result["expected"]


# ---------------------------------------------------------------- 12: faults in errcheck


def test_fault_inside_errcheck_of_a_faulted_call(crashers):
    """The outer call faults; its errcheck makes another guarded call, which faults too.
    The inner fault is raised inside errcheck; the outer one is not lost: it is raised
    by the outer call, with the inner one as its context."""
    outer = setup_signatures(ffiguard.CDLL(CRASHERS_PATH)).ffg_read_null
    inner_seen = []

    def errcheck(result, func, args):
        try:
            crashers.ffg_read_at(0x40)
        except ffiguard.SegmentationFault as e:
            inner_seen.append(e.address)
            raise

    outer.errcheck = errcheck
    with pytest.raises(ffiguard.SegmentationFault) as info:
        outer()
    assert inner_seen == [0x40]
    assert info.value.address == 0
    assert isinstance(info.value.__context__, ffiguard.SegmentationFault)
    assert info.value.__context__.address == 0x40
    assert _core.pending() == 0


def test_fault_inside_restype_callable_of_a_faulted_call(crashers):
    outer = setup_signatures(ffiguard.CDLL(CRASHERS_PATH)).ffg_read_null
    inner_seen = []

    def restype(value):
        try:
            crashers.ffg_read_at(0x80)
        except ffiguard.SegmentationFault as e:
            inner_seen.append(e.address)
        return value

    outer.restype = restype
    with pytest.raises(ffiguard.SegmentationFault) as info:
        outer()
    assert inner_seen == [0x80]
    assert info.value.address == 0
    assert _core.pending() == 0


# ---------------------------------------------------------------- argument conversion


def test_guarded_call_during_argument_conversion_keeps_the_outer_guard(run_python):
    """from_param runs Python code between the outer call's arming and its foreign call;
    a guarded call made there must not take the outer guard, and the outer call is
    still guarded afterwards."""
    rc, out, err = run_python("""
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
other = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))

class Address:
    @classmethod
    def from_param(cls, value):
        return ctypes.c_size_t(other.ffg_add(value, 0))   # a guarded call, nested

lib.ffg_read_at.argtypes = [Address]
for i in range(3):
    try:
        lib.ffg_read_at(0x40)
    except ffiguard.SegmentationFault as e:
        print(e.function, hex(e.address), flush=True)
""")
    assert rc == 0, (rc, out, err)
    assert out == "ffg_read_at 0x40\n" * 3, (out, err)


# ---------------------------------------------------------------- callee-saved registers


def test_callee_saved_registers_after_recovery():
    """Machine code sets every callee-saved register to a known value, calls a guarded
    function that wrecks them all and faults, and checks them after the recovered call
    returned to it (x86-64: rbx, rbp, r12-r15; AArch64: x19-x29, d8-d15, sp)."""
    raw = ctypes.CDLL(CRASHERS_PATH)
    probe = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))(
        ("ffg_probe_callee_saved", raw))
    same = ctypes.c_int(-1)
    assert probe(ctypes.cast(raw.ffg_noop, ctypes.c_void_p), ctypes.byref(same)) == 1
    target = ctypes.cast(raw.ffg_clobber_and_fault, ctypes.c_void_p).value
    guarded = _core.GuardedFunction(probe, "probe", None, target)
    stub = _core.stub(target)
    for _ in range(3):
        same.value = -1
        with pytest.raises(ffiguard.SegmentationFault) as info:
            guarded(stub, ctypes.byref(same))
        assert info.value.address == 0
        assert same.value == 1
