"""Living with other signal handlers: the previous handler gets each signal that is not
a guarded call's exactly as the kernel would give it without ffiguard, and a handler
installed after ffiguard's stays first in line whatever re-installs ffiguard.

The other handlers are C code of their own (tests/chainlib.c, compiled here with the
system C compiler): a runtime that recovers from faults in memory it owns, a prober
that escapes with siglongjmp, a one-shot handler, a handler that calls abort(), one
that is re-entered. Every case runs in a fresh interpreter; each is also run without
ffiguard where that shows what "as the kernel would" means.
"""
import os
import shutil
import signal
import subprocess
import sysconfig

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RT_REPAIR, RT_JUMP = 0, 1


def _compiler():
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        cc = ["cc"]
    return cc


@pytest.fixture(scope="module")
def chainlib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("chainlib") / "libchain.so")
    cmd = _compiler() + ["-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
                         "-o", out, os.path.join(HERE, "chainlib.c")]
    subprocess.run(cmd, check=True)
    return out


def prelude(path):
    return f"""
import faulthandler, threading
CHAIN_PATH = {path!r}

def load_chain(loader):
    lib = loader(CHAIN_PATH)
    lib.probe_readable.argtypes = [ctypes.c_size_t]
    lib.rt_track_writes.argtypes = [ctypes.c_long]
    lib.rt_track_writes.restype = ctypes.c_long
    lib.rt_faults_seen.restype = lib.nest_calls_seen.restype = ctypes.c_long
    return lib

chain = load_chain(ctypes.CDLL)          # unguarded
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
"""


IMPORT_AND_RECOVER = """
import ffiguard
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
def recover(tag):
    try:
        lib.ffg_read_null()
    except ffiguard.SegmentationFault as e:
        assert e.address == 0, e.address
        print(tag, "recovered", flush=True)
recover("first")
"""


# ---------------------------------------------------------------- item 5: siglongjmp


@pytest.mark.parametrize("where", ["main", "guarded-thread"])
def test_prober_escaping_with_siglongjmp_probes_again_and_again(run_python, chainlib, where):
    """A previous handler that escapes with siglongjmp leaves nothing behind: every probe
    works, and guarded faults are still recovered on the same thread. ("guarded-thread":
    the thread has ffiguard's alternate stack when it probes; the main thread probes
    before its first guarded call, on its own stack.)"""
    body = """
def work():
    if WHERE == "guarded-thread":
        lib.ffg_noop()
    ok = ctypes.create_string_buffer(8)
    got = [chain.probe_readable(a) for _ in range(200) for a in (ctypes.addressof(ok), 16)]
    print(got.count(1), got.count(0), flush=True)
    for i in range(3):
        recover(i)
        print(chain.probe_readable(16), chain.probe_readable(ctypes.addressof(ok)), flush=True)
if WHERE == "main":
    work()
else:
    t = threading.Thread(target=work); t.start(); t.join()
"""
    rc, out, err = run_python(prelude(chainlib) + "assert chain.probe_init() == 0\n"
                              + IMPORT_AND_RECOVER.replace('recover("first")', "")
                              + f"WHERE = {where!r}\n" + body, timeout=60)
    assert out == "200 200\n0 recovered\n0 1\n1 recovered\n0 1\n2 recovered\n0 1\n", (out, err)
    assert rc == 0, (rc, err)


def test_reentered_previous_handler_is_not_taken_for_a_loop(run_python, chainlib):
    """A previous handler (SA_NODEFER) that faults while handling a fault, and escapes
    from the inner call with siglongjmp, gets the inner fault too, as without ffiguard."""
    for with_ffiguard in (False, True):
        rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.nest_init(0) == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
for i in range(1, 4):
    print(chain.nest_touch(i), chain.nest_calls_seen(), flush=True)
if {with_ffiguard}:
    recover("after")
""", timeout=60)
        assert out == ("first recovered\n" if with_ffiguard else "") + "1 2\n2 4\n3 6\n" + (
            "after recovered\n" if with_ffiguard else ""), (with_ffiguard, out, err)
        assert rc == 0, (with_ffiguard, rc, err)


def test_fault_inside_a_previous_handler_is_its_own_even_during_a_guarded_call(run_python, chainlib):
    """A SIGABRT sent by kill() is never a guarded call's, even while one runs: it goes to
    the previous handler, which faults (SIGSEGV) while handling it, and escapes that
    fault with siglongjmp. That inner fault is the previous handler's, not the guarded
    call's (which it would be taken for by its place alone: a guard frame, no GIL), as
    without ffiguard: the sleep is interrupted, nothing is raised. (SIGABRT, not SIGSEGV:
    qemu-user keeps a kill()ed SIGSEGV to itself.)"""
    for with_ffiguard in (False, True):
        rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.nest_init(1) == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
    libc = ffiguard.CDLL("libc.so.6")
else:
    libc = ctypes.CDLL("libc.so.6")
import time
def send():
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGABRT)
t = threading.Thread(target=send); t.start()
try:
    print("usleep", libc.usleep(5000000), flush=True)
except Exception as e:
    print("raised", type(e).__name__, flush=True)
t.join()
print(chain.nest_calls_seen(), flush=True)
if {with_ffiguard}:
    recover("after")
""", timeout=60)
        assert out == ("first recovered\n" if with_ffiguard else "") + "usleep -1\n2\n" + (
            "after recovered\n" if with_ffiguard else ""), (with_ffiguard, out, err)
        assert rc == 0, (with_ffiguard, rc, err)


@pytest.mark.parametrize("nodefer", [0, 1], ids=["", "SA_NODEFER"])
def test_previous_handler_runs_with_the_mask_the_kernel_would_give_it(run_python, chainlib, nodefer):
    """The mask at the fault (SIGUSR2 blocked), plus the handler's sa_mask (SIGUSR1),
    plus the signal itself unless SA_NODEFER."""
    for with_ffiguard in (False, True):
        rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.mask_init({nodefer}) == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
plain.ffg_read_null()
""", timeout=60)
        assert err.endswith(f"mask: segv={1 - nodefer} usr1=1 usr2=1\n"), (with_ffiguard, err)
        assert rc == 3, (with_ffiguard, rc, err)


# ---------------------------------------------------------------- item 6: SA_RESETHAND


@pytest.mark.parametrize("with_ffiguard", [False, True])
def test_one_shot_previous_handler_runs_once_then_default_action(run_python, chainlib, with_ffiguard):
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.once_init(signal.SIGSEGV) == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
print("crashing", flush=True)
plain.ffg_read_null()      # the one-shot handler returns: the fault happens again, default
print("survived", flush=True)
""", timeout=60)
    assert out == ("first recovered\n" if with_ffiguard else "") + "crashing\n", (out, err)
    assert err.count("one-shot handler") == 1, err[:2000]
    assert rc == -signal.SIGSEGV, (rc, err[:2000])


@pytest.mark.parametrize("with_ffiguard", [False, True])
def test_one_shot_previous_handler_of_a_sent_signal(run_python, chainlib, with_ffiguard):
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.once_init(signal.SIGABRT) == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
plain.ffg_raise(signal.SIGABRT)
print("raise returned", flush=True)
plain.ffg_raise(signal.SIGABRT)
print("survived", flush=True)
""", timeout=60)
    assert out == ("first recovered\n" if with_ffiguard else "") + "raise returned\n", (out, err)
    assert err.count("one-shot handler") == 1, err[:2000]
    assert rc == -signal.SIGABRT, (rc, err[:2000])


# ---------------------------------------------------------------- item 7: repair loops


def test_previous_handler_repairing_the_same_fault_500000_times(run_python, chainlib):
    """mprotect-based write tracking: the same instruction faults at the same address,
    soon after each repair, 500,000 times (as it does without ffiguard). No handler but
    faulthandler's is ever taken for one that does nothing."""
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.rt_init({RT_REPAIR}) == 0
exec({IMPORT_AND_RECOVER!r})
print(chain.rt_track_writes(500000), chain.rt_faults_seen(), flush=True)
recover("after")
""", timeout=600)
    assert out == "first recovered\n500000 500000\nafter recovered\n", (out, err)
    assert rc == 0, (rc, err)


# ---------------------------------------------------------------- item 8: abort() in a handler


@pytest.mark.parametrize("with_ffiguard", [False, True])
def test_previous_segv_handler_calling_abort_reaches_previous_abrt_handler(run_python, chainlib,
                                                                          with_ffiguard):
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.mark_init() == 0 and chain.abort_init() == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
print("crashing", flush=True)
plain.ffg_read_null()
print("survived", flush=True)
""", timeout=60)
    assert out == ("first recovered\n" if with_ffiguard else "") + "crashing\n", (out, err)
    assert "segv handler calls abort\nabrt handler ran\n" in err, err
    assert rc == -signal.SIGABRT, (rc, err)


@pytest.mark.parametrize("with_ffiguard", [False, True])
def test_previous_segv_handler_calling_abort_reaches_faulthandler(run_python, chainlib, with_ffiguard):
    """faulthandler (enabled at startup) is the SIGABRT handler before ffiguard's."""
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.abort_init() == 0
if {with_ffiguard}:
    exec({IMPORT_AND_RECOVER!r})
print("crashing", flush=True)
plain.ffg_read_null()
print("survived", flush=True)
""", "-X", "faulthandler", timeout=60)
    assert out == ("first recovered\n" if with_ffiguard else "") + "crashing\n", (out, err)
    assert "segv handler calls abort\n" in err, err
    assert err.count("Fatal Python error: Aborted") == 1, err
    assert rc == -signal.SIGABRT, (rc, err)


# ---------------------------------------------------------------- item 9: a runtime on top


# How the runtime's handler and ffiguard's come to be where they are. In every one of
# these the runtime's handler was installed after ffiguard's and must stay first.
ORDERS = {
    "init after import": "",
    "then refresh()": "assert ffiguard.signals.refresh() == 0",
    "then select(all)": "ffiguard.signals.select('all')",
    "then select(SEGV)": "ffiguard.signals.select('SEGV')",
    "then untrap and select(all)": "ffiguard.signals.select('BUS'); ffiguard.signals.select('all')",
    "then faulthandler.enable() again": "faulthandler.enable()",
}

RUNTIME = """
assert chain.rt_init(MODE) == 0
{then}
grt = load_chain(ffiguard.CDLL)            # the runtime's own functions, guarded
def touches(n, f):
    return [f(i) for i in range(1, n + 1)]
expect = (lambda n: list(range(1, n + 1))) if MODE == 0 else (lambda n: [-1] * n)
assert touches(50, grt.rt_touch) == expect(50)     # inside guarded calls
recover("runtime on top")
t = threading.Thread(target=lambda: (print(touches(20, grt.rt_touch) == expect(20), flush=True),
                                     recover("thread")))
t.start(); t.join()
assert touches(30, chain.rt_touch) == expect(30)   # unguarded
recover("again")
print(chain.rt_faults_seen(), flush=True)
"""


@pytest.mark.parametrize("mode", [RT_REPAIR, RT_JUMP], ids=["repair", "siglongjmp"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_runtime_installed_after_ffiguard_keeps_its_faults(run_python, chainlib, order, mode):
    args = ("-X", "faulthandler") if "faulthandler" in order else ()
    rc, out, err = run_python(prelude(chainlib) + IMPORT_AND_RECOVER + f"MODE = {mode}\n"
                              + RUNTIME.format(then=ORDERS[order]), *args, timeout=60)
    assert out == ("first recovered\nruntime on top recovered\nTrue\nthread recovered\n"
                   "again recovered\n100\n"), (out, err)
    assert rc == 0, (rc, err)
    assert "Fatal Python error" not in err, err


def test_runtime_initialized_before_ffiguard(run_python, chainlib):
    """The runtime's handler is ffiguard's previous one: it gets every fault that is not
    a guarded call's, each time. A fault inside a guarded call is the guarded call's,
    even in the runtime's memory: ffiguard's handler decides first and cannot know that
    the handler below it would have repaired it (see docs/design.md)."""
    rc, out, err = run_python(prelude(chainlib) + f"""
assert chain.rt_init({RT_REPAIR}) == 0
exec({IMPORT_AND_RECOVER!r})
print([chain.rt_touch(i) for i in range(1, 51)] == list(range(1, 51)), flush=True)
grt = load_chain(ffiguard.CDLL)
try:
    grt.rt_touch(7)
except ffiguard.SegmentationFault as e:
    print("guarded touch:", e.code_name, flush=True)
print([chain.rt_touch(i) for i in range(1, 11)] == list(range(1, 11)), chain.rt_faults_seen(), flush=True)
""", timeout=60)
    assert out == "first recovered\nTrue\nguarded touch: SEGV_ACCERR\nTrue 60\n", (out, err)
    assert rc == 0, (rc, err)


@pytest.mark.parametrize("how", ["refresh", "select"])
def test_handler_removed_outright_is_put_back(run_python, how):
    """SIG_DFL (or SIG_IGN) installed over ffiguard's handler takes nobody's signals away
    if ffiguard's goes back: refresh() and select() do that, and only that."""
    put_back = {"refresh": "print('moved', ffiguard.signals.refresh())",
                "select": "ffiguard.signals.select('all')"}[how]
    rc, out, err = run_python(f"""
exec({IMPORT_AND_RECOVER!r})
print(ffiguard.signals.refresh())
signal.signal(signal.SIGSEGV, signal.SIG_DFL)
signal.signal(signal.SIGFPE, signal.SIG_IGN)
{put_back}
recover("put back")
try:
    lib.ffg_raise(signal.SIGFPE)
except ffiguard.ArithmeticFault:
    print("fpe recovered", flush=True)
print(ffiguard.signals.refresh())
""", timeout=30)
    moved = "moved 2\n" if how == "refresh" else ""
    assert out == f"first recovered\n0\n{moved}put back recovered\nfpe recovered\n0\n", (out, err)
    assert rc == 0, (rc, err)


# ---------------------------------------------------------------- faulthandler


def test_faulthandler_disabled_behind_our_back(run_python):
    """faulthandler enabled after ffiguard's import, then disabled without the wrapper
    (as C code does at interpreter exit): its idle handler is skipped, an unguarded fault
    takes the default action at once, and guarded faults are still recovered."""
    rc, out, err = run_python("""
import faulthandler
exec(IMPORT)
faulthandler.enable()
recover("enabled")
faulthandler.disable.__wrapped__()      # the real disable(): ffiguard does not see it
recover("disabled")
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
print("crashing", flush=True)
plain.ffg_read_null()
print("survived", flush=True)
""".replace("IMPORT", repr(IMPORT_AND_RECOVER)), timeout=30)
    assert out == "first recovered\nenabled recovered\ndisabled recovered\ncrashing\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)
    assert "Fatal Python error" not in err, err


@pytest.mark.parametrize("signame, crash", [("SIGSEGV", "plain.ffg_read_null()"),
                                            ("SIGABRT", "plain.ffg_abort()")])
@pytest.mark.parametrize("when", ["-X faulthandler", "enable after import"])
def test_faulthandler_reports_once_and_dies_with_the_signal(run_python, signame, crash, when):
    args = ("-X", "faulthandler") if when == "-X faulthandler" else ()
    enable = "faulthandler.enable()" if when == "enable after import" else ""
    rc, out, err = run_python(f"""
import faulthandler
exec({IMPORT_AND_RECOVER!r})
{enable}
recover("second")
plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
print("crashing", flush=True)
{crash}
print("survived", flush=True)
""", *args, timeout=30)
    signum = getattr(signal, signame)
    assert out == "first recovered\nsecond recovered\ncrashing\n", (out, err)
    assert rc == -signum, (rc, err)
    headline = {"SIGSEGV": "Segmentation fault", "SIGABRT": "Aborted"}[signame]
    assert err.count("Fatal Python error: " + headline) == 1, err
    assert err.count("Fatal Python error") == 1, err


# ---------------------------------------------------------------- signal numbers


def test_signal_numbers_out_of_range_are_rejected(run_python):
    rc, out, err = run_python("""
import ffiguard
from ffiguard import _core
bad = [0, -1, 65, 2**31 + 6, 2**32 + 6, 2**63 + 6, 2**64 + 6, -(2**32) + 6]
for f in (_core.untrap, _core.is_trapped, lambda s: _core.install([s])):
    for s in bad:
        try:
            f(s)
        except (ValueError, OverflowError):
            pass
        else:
            print("accepted", f, s)
for s in [-1, 65, 2**32 + 6, 2**64]:
    try:
        _core.recovered(s)
    except (ValueError, OverflowError):
        pass
    else:
        print("recovered accepted", s)
for f in (_core.untrap, _core.is_trapped, _core.recovered):
    try:
        f(6.0)
    except TypeError:
        pass
    else:
        print("accepted a float", f)
print(_core.recovered(0), all(_core.is_trapped(int(s)) for s in ffiguard.signals.ALL))
lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
try:
    lib.ffg_abort()
except ffiguard.ForeignAbort:
    print("abort still trapped")
""", timeout=30)
    assert out == "0 True\nabort still trapped\n", (out, err)
    assert rc == 0, (rc, err)
