"""Process-level behaviour, each case in a fresh interpreter: faults outside guarded
calls still kill the process with the same signal, faulthandler still reports,
earlier handlers are chained, and repeated faults leak nothing."""
import json
import signal
from collections import Counter

import pytest

def fatal_in(signum, text):
    """faulthandler's headline for signum appears in text (any Python version)."""
    want = FATAL[signum]
    return want in text or want.replace("Floating-point", "Floating point") in text


FATAL = {
    signal.SIGSEGV: "Fatal Python error: Segmentation fault",
    signal.SIGBUS: "Fatal Python error: Bus error",
    signal.SIGILL: "Fatal Python error: Illegal instruction",
    signal.SIGFPE: "Fatal Python error: Floating-point exception",  # 3.13; earlier: no hyphen
    signal.SIGABRT: "Fatal Python error: Aborted",
}

# Unguarded crashes (through plain ctypes), as snippet text, with the signal they die of.
UNGUARDED = {
    "read_null": ("plain.ffg_read_null()", signal.SIGSEGV),
    "write_null": ("plain.ffg_write_null()", signal.SIGSEGV),
    "call_null": ("plain.ffg_call_null()", signal.SIGSEGV),
    "string_at": ("ctypes.string_at(0)", signal.SIGSEGV),
    "stack_overflow": ("plain.ffg_recurse(0)", signal.SIGSEGV),
    "raise_segv": ("plain.ffg_raise(signal.SIGSEGV)", signal.SIGSEGV),
    "bus": ("plain.ffg_read_past_eof(bus_fd(), ctypes.byref(ctypes.c_size_t()))", signal.SIGBUS),
    "ill": ("plain.ffg_illegal_instruction()", signal.SIGILL),
    "fpe": ("plain.ffg_divide(1, 0)", signal.SIGFPE),
    "abort": ("plain.ffg_abort()", signal.SIGABRT),
    "assert": ("plain.ffg_assert_positive(0)", signal.SIGABRT),
}

SETUP = """
import tempfile, threading
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))

def bus_fd():
    f = tempfile.TemporaryFile()
    f.write(b"x")
    f.flush()
    return os.dup(f.fileno())
"""

GUARDED_FIRST = """
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
for fn, args in [(lib.ffg_read_null, ()), (lib.ffg_divide, (1, 0)), (lib.ffg_abort, ()),
                 (lib.ffg_illegal_instruction, ()), (lib.ffg_recurse, (0,))]:
    try:
        fn(*args)
    except ffiguard.ForeignFault:
        pass
    else:
        raise SystemExit("guarded call did not fault")
print("recovered", flush=True)
"""


def crash_snippet(crash, where):
    """Run `crash` on the main thread, or on a new thread (which first makes a
    guarded call when where == 'guarded-thread')."""
    if where == "main":
        return f"""
print("crashing", flush=True)
sys.stderr.write("MARK\\n"); sys.stderr.flush()
{crash}
print("survived", flush=True)
"""
    pre = "lib.ffg_add(1, 2)" if where == "guarded-thread" else "pass"
    return f"""
def body():
    {pre}
    print("crashing", flush=True)
    sys.stderr.write("MARK\\n"); sys.stderr.flush()
    {crash}
    print("survived", flush=True)
t = threading.Thread(target=body)
t.start()
t.join()
print("main survived", flush=True)
"""


# ---------------------------------------------------------------- unguarded faults die


@pytest.mark.parametrize("kind", list(UNGUARDED))
def test_unguarded_fault_without_ffiguard_baseline(run_python, kind):
    """The reference: what each crash does when ffiguard is not imported at all."""
    crash, signum = UNGUARDED[kind]
    rc, out, err = run_python(SETUP + crash_snippet(crash, "main"))
    assert rc == -signum, (rc, err)
    assert out == "crashing\n"


@pytest.mark.parametrize("where", ["main", "guarded-thread", "fresh-thread"])
@pytest.mark.parametrize("kind", list(UNGUARDED))
def test_unguarded_fault_after_recovered_fault_dies_with_same_signal(run_python, kind, where):
    crash, signum = UNGUARDED[kind]
    rc, out, err = run_python(SETUP + GUARDED_FIRST + crash_snippet(crash, where))
    assert out == "recovered\ncrashing\n", (out, err)
    assert rc == -signum, (rc, err)
    assert "ForeignFault" not in err and "Traceback" not in err, err


def test_unguarded_fault_right_after_import(run_python):
    rc, out, err = run_python(SETUP + "import ffiguard\n" + crash_snippet("ctypes.string_at(0)", "main"))
    assert out == "crashing\n"
    assert rc == -signal.SIGSEGV, (rc, err)


def test_sigsegv_sent_by_kill_during_guarded_call_is_not_recovered(run_python):
    """A SIGSEGV sent by kill() (si_code SI_USER) while the main thread sits in a
    guarded call is not a fault of that call: the process dies, as without ffiguard."""
    rc, out, err = run_python("""
        import threading, time
        import ffiguard
        libc = ffiguard.CDLL("libc.so.6")

        def killer():
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGSEGV])
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGSEGV)

        threading.Thread(target=killer, daemon=True).start()
        print("sleeping", flush=True)
        try:
            libc.sleep(5)
        except ffiguard.ForeignFault as e:
            print("recovered", e, flush=True)
        print("survived", flush=True)
    """, timeout=20)
    assert out == "sleeping\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)


def test_guard_works_in_forked_child(run_python):
    rc, out, err = run_python("""
        import threading
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault:
            print("parent ok", flush=True)
        pid = os.fork()
        if pid == 0:
            try:
                lib.ffg_write_null()
            except ffiguard.SegmentationFault as e:
                ok = e.address == 0 and e.access == "write"
            res = []
            def body():
                try:
                    lib.ffg_divide(1, 0)
                except ffiguard.ArithmeticFault:
                    res.append(1)
            t = threading.Thread(target=body); t.start(); t.join()
            os._exit(0 if ok and res == [1] else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
        pid = os.fork()
        if pid == 0:
            plain.ffg_read_null()             # unguarded in the child: dies
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
    """, timeout=20)
    assert rc == 0, (rc, err)
    assert out == f"parent ok\nchild 0\nchild {-int(signal.SIGSEGV)}\n", (out, err)


MACHINE_CODE = """
import mmap
CODE = bytes.fromhex(
    # crash: wreck the state the ABI promises at a call boundary, then fault
    "4883ec08"          # sub    rsp, 8
    "c70424807f0000"    # mov    dword [rsp], 0x7f80   (MXCSR: round toward zero)
    "0fae1424"          # ldmxcsr [rsp]
    "66c704247f0c"      # mov    word [rsp], 0x0c7f    (x87: single precision, truncate)
    "d92c24"            # fldcw  [rsp]
    "fd"                # std                          (direction flag set)
    "31db" "31ed" "4531e4" "4531ed" "4531f6" "4531ff"  # zero rbx rbp r12-r15
    "8b042500000000"    # mov    eax, [0]              (SIGSEGV, address 0)
    "4883c408"          # add    rsp, 8
    "c3"                # ret
    # rd_mxcsr at 0x35
    "0fae5c24fc" "8b4424fc" "c3"
    # rd_fpucw at 0x3f
    "d97c24fe" "0fb74424fe" "c3"
    # rd_flags at 0x49
    "9c" "58" "c3"
)
mem = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
mem.write(CODE)
base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
crash = ctypes.CFUNCTYPE(ctypes.c_int)(base)
rd_mxcsr = ctypes.CFUNCTYPE(ctypes.c_uint32)(base + 0x35)
rd_fpucw = ctypes.CFUNCTYPE(ctypes.c_uint32)(base + 0x3f)
rd_flags = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + 0x49)
"""


def test_recovery_restores_abi_state(run_python):
    """After a recovered fault the caller finds what the ABI promises at a call
    boundary: callee-saved registers, MXCSR and x87 control word as at entry, and the
    direction flag clear, whatever the foreign code did to them before faulting."""
    rc, out, err = run_python(MACHINE_CODE + """
import ffiguard
before = (rd_mxcsr(), rd_fpucw(), rd_flags() & 0x400)
guarded = ffiguard.guard(crash)
for i in range(3):
    try:
        guarded()
    except ffiguard.SegmentationFault as e:
        assert e.address == 0 and e.pc == base + 0x29, (e.address, e.pc - base)
    after = (rd_mxcsr(), rd_fpucw(), rd_flags() & 0x400)
    a, b = 0.1, 0.2
    print(before == after, [hex(v) for v in before], [hex(v) for v in after],
          (a + b).hex(), flush=True)
""")
    assert rc == 0, (rc, err)
    lines = out.splitlines()
    assert len(lines) == 3, (out, err)
    for line in lines:
        # 0.1 + 0.2 rounded to nearest (toward zero would give ...333p-2)
        assert line.startswith("True ") and line.endswith(" 0x1.3333333333334p-2"), line


# ---------------------------------------------------------------- faulthandler


@pytest.mark.parametrize("where", ["main", "guarded-thread"])
@pytest.mark.parametrize("kind", ["read_null", "string_at", "stack_overflow", "bus", "ill",
                                  "fpe", "abort"])
def test_faulthandler_report_for_unguarded_fault(run_python, kind, where):
    crash, signum = UNGUARDED[kind]
    rc, out, err = run_python(SETUP + GUARDED_FIRST + crash_snippet(crash, where),
                              "-X", "faulthandler", timeout=30)
    assert out == "recovered\ncrashing\n", (out, err)
    assert rc == -signum, (rc, err)
    after = err.split("MARK\n", 1)[1]
    assert fatal_in(signum, after), err
    assert "most recent call first" in after, err


def test_recovered_faults_print_no_faulthandler_report(run_python):
    rc, out, err = run_python(SETUP + GUARDED_FIRST + crash_snippet("plain.ffg_read_null()", "main"),
                              "-X", "faulthandler", timeout=30)
    assert rc == -signal.SIGSEGV, (rc, err)
    before, after = err.split("MARK\n", 1)
    assert "Fatal Python error" not in before, before
    assert after.count("Fatal Python error: Segmentation fault") == 1, after


ENABLE_AFTER_IMPORT = """
import faulthandler
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))

def guarded_faults(tag):
    for fn, args, cls in [(lib.ffg_read_null, (), ffiguard.SegmentationFault),
                          (lib.ffg_write_null, (), ffiguard.SegmentationFault),
                          (lib.ffg_abort, (), ffiguard.ForeignAbort),
                          (lib.ffg_divide, (1, 0), ffiguard.ArithmeticFault),
                          (lib.ffg_recurse, (0,), ffiguard.ForeignStackOverflow)]:
        try:
            fn(*args)
        except cls:
            pass
        else:
            raise SystemExit("no fault")
    # and on another thread
    res = []
    def body():
        try:
            lib.ffg_read_at(0x40)
        except ffiguard.SegmentationFault as e:
            res.append(e.address)
    t = threading.Thread(target=body); t.start(); t.join()
    assert res == [0x40], res
    print(tag, flush=True)

guarded_faults("before enable")
faulthandler.enable()
guarded_faults("after enable")
"""


@pytest.mark.parametrize("where", ["main", "guarded-thread", "fresh-thread"])
def test_faulthandler_enabled_after_import(run_python, where):
    rc, out, err = run_python(SETUP + ENABLE_AFTER_IMPORT
                              + crash_snippet("plain.ffg_read_null()", where), timeout=30)
    assert out == "before enable\nafter enable\ncrashing\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)
    after = err.split("MARK\n", 1)[1]
    assert fatal_in(signal.SIGSEGV, after), err


def test_faulthandler_enabled_after_import_recovered_faults_are_silent(run_python):
    rc, out, err = run_python(SETUP + ENABLE_AFTER_IMPORT
                              + crash_snippet("plain.ffg_read_null()", "main"), timeout=30)
    assert rc == -signal.SIGSEGV, (rc, err)
    before = err.split("MARK\n", 1)[0]
    assert "Fatal Python error" not in before, before


@pytest.mark.parametrize("where", ["main", "guarded-thread"])
@pytest.mark.parametrize("kind", ["read_null", "abort", "fpe"])
def test_faulthandler_enabled_then_disabled(run_python, kind, where):
    crash, signum = UNGUARDED[kind]
    code = (SETUP + ENABLE_AFTER_IMPORT
            + "faulthandler.disable()\nguarded_faults('after disable')\n"
            + crash_snippet(crash, where))
    rc, out, err = run_python(code, timeout=20)  # a handler loop would time out
    assert out == "before enable\nafter enable\nafter disable\ncrashing\n", (out, err)
    assert rc == -signum, (rc, err)
    assert "Fatal Python error" not in err, err


def test_faulthandler_enabled_twice_and_disabled(run_python):
    code = (SETUP + ENABLE_AFTER_IMPORT
            + "faulthandler.disable()\nfaulthandler.enable()\nguarded_faults('re-enabled')\n"
            + crash_snippet("plain.ffg_write_null()", "main"))
    rc, out, err = run_python(code, timeout=20)
    assert out == "before enable\nafter enable\nre-enabled\ncrashing\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)
    assert fatal_in(signal.SIGSEGV, err.split("MARK\n", 1)[1])


# ---------------------------------------------------------------- chaining


@pytest.mark.parametrize("signame", ["SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL"])
def test_previous_python_handler_is_chained(run_python, signame):
    rc, out, err = run_python(f"""
        got = []
        signal.signal(signal.{signame}, lambda s, f: got.append(s))
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        try:
            lib.ffg_raise(signal.{signame})    # guarded: recovered, not chained
        except ffiguard.ForeignFault as e:
            print("guarded", e.signal.name, flush=True)
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault:
            print("guarded segv", flush=True)
        libc = ctypes.CDLL("libc.so.6")
        for i in range(3):                   # unguarded: each goes to the Python handler
            r = getattr(libc, "raise")(signal.{signame})
            for _ in range(3):
                pass                         # let the Python handler run
            print("raise returned", r, "handler got", len(got), flush=True)
        print(got, flush=True)
    """, timeout=20)
    signum = int(getattr(signal, signame))
    assert out == (f"guarded {signame}\nguarded segv\n"
                   "raise returned 0 handler got 1\n"
                   "raise returned 0 handler got 2\n"
                   "raise returned 0 handler got 3\n"
                   f"[{signum}, {signum}, {signum}]\n"), (out, err)
    assert rc == 0, (rc, err)


# A C-level SIGSEGV handler installed before ffiguard that repairs the fault and
# returns (what a GC write barrier or a JVM does): written as a ctypes callback that
# makes the page writable again. The same instruction faults at the same address
# again on every round.
REPAIRING_HANDLER = """
import mmap
libc = ctypes.CDLL("libc.so.6")
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

class SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]

m = mmap.mmap(-1, mmap.PAGESIZE)
page = ctypes.addressof(ctypes.c_char.from_buffer(m))
handled = []

@ctypes.CFUNCTYPE(None, ctypes.c_int)
def on_segv(signo):
    handled.append(signo)
    libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)

sa = SigAction()
sa.handler = ctypes.cast(on_segv, ctypes.c_void_p).value
assert libc.sigaction(signal.SIGSEGV, ctypes.byref(sa), None) == 0
"""


@pytest.mark.parametrize("with_ffiguard", [False, True])
def test_previous_c_handler_that_repairs_faults_is_chained_every_time(run_python, with_ffiguard):
    rc, out, err = run_python(REPAIRING_HANDLER + f"""
if {with_ffiguard}:
    import ffiguard
    glib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
    try:
        glib.ffg_read_null()
    except ffiguard.SegmentationFault:
        pass
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
for i in range(3):
    libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)
    plain.ffg_write_at(page, i + 1)         # unguarded: faults, repaired, retried
    print(i, m[0], len(handled), flush=True)
""", timeout=20)
    assert out == "0 1 1\n1 2 2\n2 3 3\n", (out, err)
    assert rc == 0, (rc, err)


def test_previous_handler_chained_from_other_thread(run_python):
    rc, out, err = run_python("""
        import threading
        got = []
        signal.signal(signal.SIGABRT, lambda s, f: got.append(s))
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        libc = ctypes.CDLL("libc.so.6")
        def body():
            try:
                lib.ffg_abort()
            except ffiguard.ForeignAbort:
                print("guarded abort", flush=True)
            getattr(libc, "raise")(signal.SIGABRT)
        t = threading.Thread(target=body); t.start(); t.join()
        for _ in range(3):
            pass
        print("handler got", got, flush=True)
    """, timeout=20)
    assert rc == 0, (rc, err)
    assert out == f"guarded abort\nhandler got [{int(signal.SIGABRT)}]\n", (out, err)


def test_ignored_sigabrt_before_import_still_dies_on_abort(run_python):
    # abort() kills even when SIGABRT is ignored: as without ffiguard.
    code = """
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
        {imp}
        plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
        print("crashing", flush=True)
        plain.ffg_abort()
        print("survived", flush=True)
    """
    for imp in ("pass", "import ffiguard; ffiguard.CDLL(CRASHERS_PATH).ffg_noop()"):
        rc, out, err = run_python(code.format(imp=imp), timeout=20)
        assert out == "crashing\n", (imp, out, err)
        assert rc == -signal.SIGABRT, (imp, rc, err)


# ---------------------------------------------------------------- no leaks


LEAK_CHECK = """
import json
mask_at_start = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
import ffiguard

lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def vm_size():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * PAGE

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def n_maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)

def state():
    return dict(rss=rss(), vm=vm_size(), fds=fds(), maps=n_maps(),
                mask=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                recovered=ffiguard.stats()["recovered"],
                by_signal=dict(ffiguard.stats()["by_signal"]))
"""


def test_ten_thousand_faults_leak_nothing(run_python):
    rc, out, err = run_python(LEAK_CHECK + """
calls = [(lib.ffg_read_null, ()), (lib.ffg_write_null, ()), (lib.ffg_divide, (1, 0)),
         (lib.ffg_illegal_instruction, ()), (lib.ffg_abort, ()), (lib.ffg_call_null, ()),
         (lib.ffg_raise, (signal.SIGBUS,)), (lib.ffg_read_at, (0x10,))]

def burst(n):
    for i in range(n):
        fn, args = (lib.ffg_recurse, (0,)) if i % 500 == 499 else calls[i % len(calls)]
        try:
            fn(*args)
        except ffiguard.ForeignFault:
            pass
        else:
            raise SystemExit("no fault")

burst(2000)   # warm up (caches, arenas, the first stack overflow)
s0 = state()
burst(10000)
s1 = state()
print(json.dumps([s0, s1, mask_at_start]))
""", timeout=60)
    assert rc == 0, (rc, err)
    s0, s1, mask_at_start = json.loads(out)
    assert s0["mask"] == mask_at_start
    assert s1["recovered"] - s0["recovered"] == 10000
    got = {k: s1["by_signal"].get(k, 0) - s0["by_signal"].get(k, 0)
           for k in set(s0["by_signal"]) | set(s1["by_signal"])}
    kinds = ["SIGSEGV", "SIGSEGV", "SIGFPE", "SIGILL", "SIGABRT", "SIGSEGV", "SIGBUS", "SIGSEGV"]
    want = Counter("SIGSEGV" if i % 500 == 499 else kinds[i % 8] for i in range(10000))
    assert {k: v for k, v in got.items() if v} == dict(want)
    assert s1["fds"] == s0["fds"]
    assert s1["mask"] == s0["mask"]
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        assert int(sig) not in s1["mask"]
    assert s1["rss"] - s0["rss"] < 1 << 20, (s0["rss"], s1["rss"])
    assert s1["vm"] - s0["vm"] < 1 << 20, (s0["vm"], s1["vm"])
    assert s1["maps"] - s0["maps"] <= 2, (s0["maps"], s1["maps"])


def test_threads_that_fault_and_exit_leak_nothing(run_python):
    rc, out, err = run_python(LEAK_CHECK + """
import threading

def body():
    for fn, args in [(lib.ffg_read_null, ()), (lib.ffg_abort, ()), (lib.ffg_recurse, (0,))]:
        try:
            fn(*args)
        except ffiguard.ForeignFault:
            pass
        else:
            raise SystemExit("no fault")

def run(n):
    for _ in range(n):
        t = threading.Thread(target=body)
        t.start()
        t.join()

threading.stack_size(256 * 1024)
run(30)       # warm up glibc's thread-stack cache
s0 = state()
run(300)
s1 = state()
print(json.dumps([s0, s1]))
""", timeout=60)
    assert rc == 0, (rc, err)
    s0, s1 = json.loads(out)
    assert s1["recovered"] - s0["recovered"] == 900
    assert s1["fds"] == s0["fds"]
    # A per-thread mapping (state + guard page + alternate stack) left behind would
    # add hundreds of mappings. (Virtual size is not compared: glibc may reserve a
    # 64 MiB malloc arena for a new thread at any point.)
    assert s1["maps"] - s0["maps"] <= 8, (s0["maps"], s1["maps"])
    assert s1["rss"] - s0["rss"] < 2 << 20, (s0["rss"], s1["rss"])
