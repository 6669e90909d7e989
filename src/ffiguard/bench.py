"""Benchmark: what a guarded foreign call costs, measured in one run.

    python -m ffiguard.bench [--rounds R] [--calls N] [--faults F] [--json]

Every variant (plain ctypes, guarded ctypes, ...) of every case is timed in the
same process, interleaved: for each of R rounds, each variant runs a loop of N
calls timed with time.perf_counter_ns, and the order of the variants is reversed
on every other round so that neither side always runs first (warm caches, CPU
frequency drift).  The table shows the median over the rounds, and the minimum.

ns/call is the whole loop divided by N: the function is bound to a local and the
arguments are locals, but the loop's own overhead (a few ns) is included on both
sides and nothing is subtracted.  "added ns" is median guarded minus median
plain; "ratio" is median guarded / median plain.

The fault row times a guarded call that faults (ffg_read_null) inside
try/except: signal, recovery, building and raising the exception, catching it.
Beside it, in the same interleaved rounds, two baselines that keep no address,
registers or backtrace: a bare sigsetjmp/siglongjmp guard in C (always: the
crashers module's baseline_read_null, whose SIGSEGV handler is installed only
around its own timed loop) and cysignals' sig_on/sig_off around the same NULL
read in a Cython module compiled now (left out, with the reason printed, when
cysignals, Cython or a C compiler is missing; its handler too is swapped in only
around its loop). Their "ratio" column is ffiguard's median over theirs.

The cffi rows (ABI mode, and API mode when a C compiler can build a module at run
time) are left out, with the reason printed, when cffi is not installed.

More rows (shield, ...) are added as entries in ``call_cases()``
(a :class:`Case`: name, plain callable, guarded callable, arguments) or in
``fault_cases()``; nothing else needs to change.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

# Goals from issue 2: guarded/plain <= 1.10 and <= 15 ns added on the
# no-argument call; fault -> exception round trip <= 10 us.
GOAL_RATIO = 1.10
GOAL_ADDED_NS = 15.0
GOAL_ADDED_ONLY = "added"  # a row's goal: only the added ns (issue 15: API-mode calls)
GOAL_FAULT_US = 10.0
GOAL_ISOLATE_US = 5.0  # issue 6: a two-int call through the helper
GOAL_ISOLATE_SPEEDUP = 8.0  # issue 6: against a multiprocessing.Pipe round trip


class Case(NamedTuple):
    """One row of the call table: the same call made plain and guarded."""

    name: str
    plain: Callable[..., Any]
    guarded: Callable[..., Any]
    args: Tuple[Any, ...] = ()
    expect: Any = None  # the result both sides must return (checked once, untimed)
    goal: Any = False  # check the goals on this row (GOAL_ADDED_ONLY: added ns only)
    scale: float = 1.0  # fraction of --calls timed per round (slow rows: fewer calls)


class FaultCase(NamedTuple):
    """One fault row: a guarded call that faults, and the exception it raises.
    enter/leave run around each timed loop (untimed): a baseline's own handler."""

    name: str
    guarded: Callable[..., Any]
    exception: type
    args: Tuple[Any, ...] = ()
    goal: bool = False
    baseline: bool = False  # a comparison row: ffiguard's fault row over it is its ratio
    enter: Optional[Callable[[], Any]] = None
    leave: Optional[Callable[[], Any]] = None


# ---- the cases ----------------------------------------------------------------


def call_cases(path: str) -> List[Case]:
    import ffiguard

    plain = ctypes.CDLL(path)
    guarded = ffiguard.CDLL(path)
    for lib in (plain, guarded):
        lib.ffg_noop.argtypes = []
        lib.ffg_noop.restype = None
        lib.ffg_add.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.ffg_add.restype = ctypes.c_int
    return [
        Case("ctypes ffg_noop()", plain.ffg_noop, guarded.ffg_noop, (), None, goal=True),
        Case("ctypes ffg_add(1, 2)", plain.ffg_add, guarded.ffg_add, (1, 2), 3),
        # interrupt (issue 16): arm and disarm the thread's timer around each call; a
        # Ctrl-C-stoppable call (main thread) asks Python's SIGINT handler and sigaction
        Case("ctypes ffg_noop(), timeout=60", plain.ffg_noop,
             ffiguard.guard(guarded.ffg_noop, timeout=60), (), None),
        Case("ctypes ffg_noop(), interruptible", plain.ffg_noop,
             ffiguard.guard(guarded.ffg_noop, interruptible=True), (), None),
    ] + cffi_cases(path)


CFFI_CDEF = "void ffg_noop(void); int ffg_add(int a, int b);"

skipped: List[str] = []  # rows left out, with the reason (printed under the table)


def cffi_cases(path: str) -> List[Case]:
    """cffi ABI mode (ffi.dlopen): plain cffi vs ffiguard.guard(ffi, lib). The
    no-argument row carries the same goals as the ctypes one."""
    import ffiguard

    try:
        import cffi
    except ImportError:
        skipped.append("cffi rows: cffi is not installed (pip install cffi)")
        return []
    ffi = cffi.FFI()
    ffi.cdef(CFFI_CDEF)
    plain = ffi.dlopen(path)
    guarded = ffiguard.guard(ffi, ffi.dlopen(path))
    cases = [
        Case("cffi ffg_noop()", plain.ffg_noop, guarded.ffg_noop, (), None, goal=True),
        Case("cffi ffg_add(1, 2)", plain.ffg_add, guarded.ffg_add, (1, 2), 3),
    ]
    return cases + cffi_api_cases(ffi, path)


def cffi_api_cases(abi_ffi, path: str) -> List[Case]:
    """cffi API mode: modules compiled now (into a temporary directory) calling the
    crashers library. Copies of the module: the plain column calls one's
    lib.ffg_add as cffi made it; the guarded column the other's, guarded in place as
    install() does (the builtin calls cffi's wrapper through a guard stub), and, a
    second row, ffiguard.guard(ffi, lib)'s function (the same call path, by hand).
    Skipped, with the reason, when nothing can compile them."""
    import shutil

    from . import for_cffi_compiled

    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        skipped.append("cffi API-mode rows: no C compiler (%s)" % cc)
        return []
    import ffiguard

    # three copies: guarding one points its GOT slots at stubs, which must not touch the
    # plain one's
    modules = []
    for name in ("_ffiguard_bench_api", "_ffiguard_bench_api_guarded", "_ffiguard_bench_api_by_hand"):
        module = _compile_api_module(name, cc, path)
        if module is None:
            return []
        modules.append(module)
    plain, in_place, by_hand_module = modules
    for_cffi_compiled.guard_module(in_place)
    by_hand = ffiguard.guard(by_hand_module.ffi, by_hand_module.lib)
    return [Case("cffi API-mode ffg_add(1, 2)", plain.lib.ffg_add, in_place.lib.ffg_add, (1, 2), 3,
                 goal=GOAL_ADDED_ONLY),
            Case("cffi API-mode ffg_add(1, 2) (guard(ffi, lib))", plain.lib.ffg_add, by_hand.ffg_add,
                 (1, 2), 3)]


def _compile_api_module(name: str, cc: str, path: str):
    """The API-mode module `name` (ffg_noop, ffg_add of the crashers library), or None
    (the reason in `skipped`)."""
    import contextlib
    import importlib
    import io
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CFFI_CDEF)
    ffi.set_source(name, "void ffg_noop(void); int ffg_add(int a, int b);")
    directory = tempfile.mkdtemp(prefix="ffiguard-bench-")
    try:
        c_file = os.path.join(directory, name + ".c")
        with contextlib.redirect_stdout(io.StringIO()):  # cffi prints "generating ..."
            ffi.emit_c_code(c_file)
        out = os.path.join(directory, name + sysconfig.get_config_var("EXT_SUFFIX"))
        command = cc.split() + [
            "-shared", "-fPIC", "-O2", "-I" + sysconfig.get_paths()["include"], c_file, "-o", out,
            path, "-Wl,-rpath," + os.path.dirname(path)]
        build = subprocess.run(command, capture_output=True, text=True)
        if build.returncode != 0:
            skipped.append("cffi API-mode rows: compiling failed: %s"
                           % (build.stderr.strip().splitlines() or ["?"])[-1])
            return None
        sys.path.insert(0, directory)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the loaded module stays mapped


def isolate_cases(path: str) -> List[Case]:
    """isolate mode: the "guarded" column is the call through the helper process (the
    Pipe row's is a multiprocessing.Pipe round trip making the same call, to compare)."""
    from .isolate import bench_rows

    cases = []
    for name, plain, isolated in bench_rows.rows(path):
        # 1 MiB rows: at least 1,000 calls per sample at the default --calls, so the
        # futex wake of a helper that slept between rows does not dominate the sample.
        scale = 0.01 if "MiB" in name else 0.05
        cases.append(Case(name, plain, isolated, (), plain(), scale=scale))
    return cases


SHIELD_SIZES = ((1 << 20, "1 MiB"), (64 << 20, "64 MiB"), (1 << 30, "1 GiB"))
# mprotect fallback rows: 0.1% of --calls with 1 MiB shielded, fewer in proportion to the
# size beyond (at least 1): a call costs ~0.1 ms per MiB shielded there.
SHIELD_FALLBACK_SCALE = 0.001


def shield_rows(path: str, rounds: int, n_calls: int) -> List[dict]:
    """shield mode: a guarded ffg_noop() with 1 MiB, 64 MiB and 1 GiB shielded (every page
    written first, as memory in use is), against the same guarded call with shield=False.
    Measured after the other rows, one size at a time: shielded memory locks every
    shielded guarded call in the process, so it must not exist while other rows run."""
    import mmap

    import ffiguard

    kind, _ = ffiguard.shield.mechanism()
    label = "protection keys" if kind == "pkeys" else "mprotect fallback"
    lib = ffiguard.CDLL(path)
    lib.ffg_noop.argtypes = []
    lib.ffg_noop.restype = None
    shielded = lib.ffg_noop
    unshielded = ffiguard.guard(shielded, shield=False)
    rows = []
    for size, size_name in SHIELD_SIZES:
        n_plain = n_calls if kind == "pkeys" else max(1, int(n_calls * SHIELD_FALLBACK_SCALE))
        n = n_calls if kind == "pkeys" else max(
            1, int(n_calls * SHIELD_FALLBACK_SCALE * (1 << 20) / size))
        buf = mmap.mmap(-1, size)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buf)), 1, size)
        ffiguard.shield(buf)
        try:
            samples = {"plain": [], "guarded": []}
            order = (("plain", unshielded, n_plain), ("guarded", shielded, n))
            for side, fn, calls in order:
                time_calls(fn, (), calls)  # warm-up
            for r in range(rounds):
                for side, fn, calls in (order if r % 2 == 0 else order[::-1]):
                    samples[side].append(time_calls(fn, (), calls))
        finally:
            ffiguard.unshield(buf)
            buf.close()
        plain, guarded = _summary(samples["plain"]), _summary(samples["guarded"])
        rows.append({
            "name": "shield (%s), %s shielded: ctypes ffg_noop() (plain: shield=False)"
                    % (label, size_name),
            "plain_ns": plain, "guarded_ns": guarded,
            "added_ns": guarded["median"] - plain["median"],
            "ratio": guarded["median"] / plain["median"], "goal": False,
        })
    return rows


def fault_cases(path: str) -> List[FaultCase]:
    import ffiguard

    guarded = ffiguard.CDLL(path)
    guarded.ffg_read_null.argtypes = []
    guarded.ffg_read_null.restype = ctypes.c_int
    return [
        FaultCase(
            "fault -> exception: ctypes ffg_read_null() in try/except",
            guarded.ffg_read_null,
            ffiguard.SegmentationFault,
            goal=True,
        ),
    ] + baseline_cases()


BASELINE_NAME = "baseline: bare sigsetjmp/siglongjmp NULL read -> exception (C)"
CYSIGNALS_NAME = "baseline: cysignals sig_on/sig_off NULL read -> SignalError (Cython)"


def baseline_cases() -> List[FaultCase]:
    """The bare C baseline (always) and cysignals (when it can be built)."""
    from . import _crashers

    bare = FaultCase(BASELINE_NAME, _crashers.baseline_read_null, _crashers.BaselineFault,
                     baseline=True, enter=_crashers.baseline_install, leave=_crashers.baseline_restore)
    return [bare] + cysignals_cases()


CYSIGNALS_PYX = '''# cython: language_level=3
from cysignals.signals cimport sig_on, sig_off

cdef extern from *:
    """
    static int bench_read_null(void) { return *(volatile int *)0; }
    """
    int bench_read_null() nogil

def read_null():
    sig_on()
    bench_read_null()
    sig_off()
'''


class _RawSignalState:
    """Every signal's raw sigaction and the alternate stack, saved and put back through
    libc (cysignals installs its handlers, and its own alternate stack, at import)."""

    ACTION_SIZE = 256  # >= sizeof(struct sigaction) on every Linux ABI
    STACK_SIZE = 64    # >= sizeof(stack_t)

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.libc.sigaltstack.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    def action(self, signo):
        buf = ctypes.create_string_buffer(self.ACTION_SIZE)
        if self.libc.sigaction(signo, None, buf) != 0:
            return None  # numbers glibc keeps for itself
        return buf

    def set_action(self, signo, buf, old=None):
        self.libc.sigaction(signo, buf, old)

    def save(self):
        import signal

        stack = ctypes.create_string_buffer(self.STACK_SIZE)
        self.libc.sigaltstack(None, stack)
        actions = {s: self.action(s) for s in range(1, signal.NSIG)}
        return stack, {s: a for s, a in actions.items() if a is not None}

    def restore(self, saved):
        stack, actions = saved
        for signo, buf in actions.items():
            self.set_action(signo, buf)
        self.libc.sigaltstack(stack, None)


def cysignals_cases() -> List[FaultCase]:
    """cysignals (pip install cysignals cython): a Cython module compiled now, in a
    temporary directory, calling sig_on(), a NULL read, sig_off(). Importing it installs
    cysignals' handlers (and alternate stack); everything is put back at once, and
    cysignals' SIGSEGV handler is swapped in only around this row's timed loop."""
    import contextlib
    import importlib
    import importlib.util
    import io
    import shutil
    import signal
    import subprocess
    import sysconfig
    import tempfile

    for module in ("cysignals", "Cython"):
        if importlib.util.find_spec(module) is None:
            skipped.append("cysignals row: %s is not installed (pip install cysignals cython)" % module)
            return []
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        skipped.append("cysignals row: no C compiler (%s)" % cc)
        return []
    if _cysignals_built:  # built and imported once per process: its handler was saved then
        return [_cysignals_case(*_cysignals_built)]
    cysignals_dir = os.path.dirname(importlib.util.find_spec("cysignals").origin)
    name = "_ffiguard_bench_cysignals"
    directory = tempfile.mkdtemp(prefix="ffiguard-bench-")
    raw = _RawSignalState()
    try:
        pyx = os.path.join(directory, name + ".pyx")
        c_file = os.path.join(directory, name + ".c")
        with open(pyx, "w") as f:
            f.write(CYSIGNALS_PYX)
        steps = [
            [sys.executable, "-m", "cython", "-3", "-I", os.path.dirname(cysignals_dir), pyx, "-o", c_file],
            cc.split() + ["-shared", "-fPIC", "-O2", "-I" + sysconfig.get_paths()["include"],
                          "-I" + cysignals_dir, "-I" + os.path.dirname(cysignals_dir), c_file, "-o",
                          os.path.join(directory, name + sysconfig.get_config_var("EXT_SUFFIX"))],
        ]
        for command in steps:
            build = subprocess.run(command, capture_output=True, text=True)
            if build.returncode != 0:
                skipped.append("cysignals row: building failed: %s"
                               % ((build.stderr or build.stdout).strip().splitlines() or ["?"])[-1])
                return []
        ours = raw.save()
        sys.path.insert(0, directory)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
            import cysignals.signals
        finally:
            sys.path.remove(directory)
            theirs = raw.action(signal.SIGSEGV)
            raw.restore(ours)
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the loaded module stays mapped
    _cysignals_built[:] = [raw, module.read_null, cysignals.signals.SignalError, theirs]
    return [_cysignals_case(*_cysignals_built)]


_cysignals_built: list = []  # [raw state, read_null, SignalError, cysignals' SIGSEGV action]


def _cysignals_case(raw, read_null, error, theirs) -> FaultCase:
    import signal

    saved = ctypes.create_string_buffer(raw.ACTION_SIZE)
    return FaultCase(CYSIGNALS_NAME, read_null, error, baseline=True,
                     enter=lambda: raw.set_action(signal.SIGSEGV, theirs, saved),
                     leave=lambda: raw.set_action(signal.SIGSEGV, saved))


# ---- timing loops ---------------------------------------------------------------

_clock = time.perf_counter_ns


def _unpack(nargs: int) -> Tuple[str, str]:
    names = "".join(f"a{i}, " for i in range(nargs))
    return names, (f"    {names}= args\n" if nargs else "")


def _call_loop_source(nargs: int) -> str:
    names, unpack = _unpack(nargs)
    return (
        "def loop(fn, args, n, clock):\n"
        f"{unpack}"
        "    r = range(n)\n"
        "    t0 = clock()\n"
        "    for _ in r:\n"
        f"        fn({names})\n"
        "    return clock() - t0\n"
    )


def _fault_loop_source(nargs: int) -> str:
    names, unpack = _unpack(nargs)
    return (
        "def loop(fn, args, n, clock, exc):\n"
        f"{unpack}"
        "    caught = 0\n"
        "    r = range(n)\n"
        "    t0 = clock()\n"
        "    for _ in r:\n"
        "        try:\n"
        f"            fn({names})\n"
        "        except exc:\n"
        "            caught += 1\n"
        "    t1 = clock()\n"
        "    return t1 - t0, caught\n"
    )


_loops = {}


def _loop(kind: str, nargs: int):
    """A loop that calls fn(a0, a1, ...) with the arguments as plain locals
    (no *args unpacking inside the timed loop), compiled once per arity."""
    key = (kind, nargs)
    if key not in _loops:
        source = (_call_loop_source if kind == "call" else _fault_loop_source)(nargs)
        namespace: dict = {}
        exec(compile(source, f"<ffiguard.bench {kind} loop/{nargs}>", "exec"), namespace)
        _loops[key] = namespace["loop"]
    return _loops[key]


def time_calls(fn, args: Sequence[Any], n: int) -> float:
    """ns per call of fn(*args) over a loop of n calls."""
    loop = _loop("call", len(args))
    enabled = gc.isenabled()
    gc.disable()
    try:
        elapsed = loop(fn, tuple(args), n, _clock)
    finally:
        if enabled:
            gc.enable()
    return elapsed / n


def time_faults(fn, args: Sequence[Any], exception: type, n: int, enter=None, leave=None) -> float:
    """ns per fault -> exception round trip of fn(*args) over n faulting calls;
    enter() and leave() run around the loop, untimed."""
    loop = _loop("fault", len(args))
    enabled = gc.isenabled()
    gc.disable()
    if enter:
        enter()
    try:
        elapsed, caught = loop(fn, tuple(args), n, _clock, exception)
    finally:
        if leave:
            leave()
        if enabled:
            gc.enable()
    if caught != n:
        raise RuntimeError(f"only {caught} of {n} calls raised {exception.__name__}")
    return elapsed / n


# ---- the run ----------------------------------------------------------------------


class Variant(NamedTuple):
    key: Tuple[str, str]  # (row name, "plain" | "guarded")
    measure: Callable[[], float]  # one timed loop -> ns per call


def _variants(calls: List[Case], faults: List[FaultCase], n_calls: int, n_faults: int):
    variants = []
    for case in calls:
        for side in ("plain", "guarded"):
            fn = getattr(case, side)
            n = max(1, int(n_calls * case.scale))
            variants.append(
                Variant((case.name, side), lambda fn=fn, a=case.args, n=n: time_calls(fn, a, n))
            )
    for case in faults:
        variants.append(
            Variant(
                (case.name, "guarded"),
                lambda c=case: time_faults(c.guarded, c.args, c.exception, n_faults, c.enter, c.leave),
            )
        )
    return variants


def _check(calls: List[Case], faults: List[FaultCase]) -> None:
    """Each call once, untimed: right results, and the fault really raises."""
    for case in calls:
        for side in ("plain", "guarded"):
            got = getattr(case, side)(*case.args)
            if got != case.expect:
                raise RuntimeError(f"{case.name} ({side}) returned {got!r}, expected {case.expect!r}")
    for case in faults:
        if case.enter:
            case.enter()
        try:
            case.guarded(*case.args)
        except case.exception:
            pass
        else:
            raise RuntimeError(f"{case.name} did not raise {case.exception.__name__}")
        finally:
            if case.leave:
                case.leave()


def _summary(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "samples": values}


def run(rounds: int, n_calls: int, n_faults: int, path: Optional[str] = None,
        isolate: bool = True, shield: bool = False) -> dict:
    import ffiguard

    path = path or ffiguard.crashers_path()
    del skipped[:]
    calls = call_cases(path) + (isolate_cases(path) if isolate else [])
    faults = fault_cases(path)
    _check(calls, faults)
    variants = _variants(calls, faults, n_calls, n_faults)

    # One untimed warm-up round (first-call costs, caches, lazy initialisation).
    for v in variants:
        v.measure()

    samples = {v.key: [] for v in variants}
    started = time.perf_counter()
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            samples[v.key].append(v.measure())
        gc.collect()
    elapsed = time.perf_counter() - started

    rows = []
    for case in calls:
        plain = _summary(samples[(case.name, "plain")])
        guarded = _summary(samples[(case.name, "guarded")])
        rows.append({
            "name": case.name,
            "plain_ns": plain,
            "guarded_ns": guarded,
            "added_ns": guarded["median"] - plain["median"],
            "ratio": guarded["median"] / plain["median"],
            "goal": case.goal,
        })
    if shield:
        rows += shield_rows(path, rounds, n_calls)
    fault_rows = []
    for case in faults:
        s = _summary([ns / 1000.0 for ns in samples[(case.name, "guarded")]])
        fault_rows.append({"name": case.name, "round_trip_us": s, "goal": case.goal,
                           "baseline": case.baseline})
    ours = next((r for r in fault_rows if r["goal"]), None)
    for row in fault_rows:  # ffiguard's round trip over each baseline's
        if row["baseline"] and ours:
            row["ffiguard_ratio"] = ours["round_trip_us"]["median"] / row["round_trip_us"]["median"]

    return {
        "machine": machine(),
        "rounds": rounds,
        "calls_per_round": n_calls,
        "faults_per_round": n_faults,
        "seconds": elapsed,
        "calls": rows,
        "faults": fault_rows,
        "goals": goals(rows, fault_rows),
        "skipped": list(skipped),
        "stats": ffiguard.stats(),
    }


def goals(rows: List[dict], fault_rows: List[dict]) -> List[dict]:
    out = []
    for row in rows:
        if row["goal"]:
            if row["goal"] != GOAL_ADDED_ONLY:
                out.append({"what": f"{row['name']}: guarded/plain <= {GOAL_RATIO:.2f}",
                            "value": round(row["ratio"], 3), "met": row["ratio"] <= GOAL_RATIO})
            out.append({"what": f"{row['name']}: added <= {GOAL_ADDED_NS:g} ns",
                        "value": round(row["added_ns"], 1), "met": row["added_ns"] <= GOAL_ADDED_NS})
    by_name = {row["name"]: row for row in rows}
    iso = by_name.get("isolate ffg_add(1, 2)")
    pipe = next((r for r in rows if r["name"].startswith("multiprocessing.Pipe")), None)
    if iso and pipe:  # issue 6
        us = iso["guarded_ns"]["median"] / 1000
        speedup = pipe["guarded_ns"]["median"] / iso["guarded_ns"]["median"]
        out.append({"what": "isolate ffg_add(1, 2) <= %g us" % GOAL_ISOLATE_US,
                    "value": round(us, 2), "met": us <= GOAL_ISOLATE_US})
        out.append({"what": "isolate >= %gx faster than a Pipe round trip" % GOAL_ISOLATE_SPEEDUP,
                    "value": round(speedup, 1), "met": speedup >= GOAL_ISOLATE_SPEEDUP})
    for row in fault_rows:
        if row["goal"]:
            med = row["round_trip_us"]["median"]
            out.append({"what": f"fault -> exception <= {GOAL_FAULT_US:g} us",
                        "value": round(med, 2), "met": med <= GOAL_FAULT_US})
    # issue 12: no slower than cysignals in the same run (the bare baseline stands in
    # for it when cysignals cannot be built)
    by_name = {row["name"]: row for row in fault_rows}
    base = by_name.get(CYSIGNALS_NAME) or by_name.get(BASELINE_NAME)
    if base and "ffiguard_ratio" in base:
        which = "cysignals" if base["name"] == CYSIGNALS_NAME else "the bare sigsetjmp baseline"
        out.append({"what": f"fault -> exception / {which} <= 1.00",
                    "value": round(base["ffiguard_ratio"], 2), "met": base["ffiguard_ratio"] <= 1.0})
    return out


# ---- the machine ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ffiguard")
    except Exception:
        import ffiguard

        return getattr(ffiguard, "__version__", "unknown")


def machine() -> dict:
    libc = platform.libc_ver()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_build": " ".join(platform.python_build()),
        "compiler": platform.python_compiler(),
        "libc": " ".join(x for x in libc if x),
        "ffiguard": _version(),
    }


# ---- output ------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The result as text; the table is also valid Markdown (paste it into the README)."""
    m = result["machine"]
    rows = [("call", "plain ns/call", "guarded ns/call", "added ns", "ratio")]
    for r in result["calls"]:
        p, g = r["plain_ns"], r["guarded_ns"]
        rows.append((
            r["name"],
            f"{p['median']:.1f} (min {p['min']:.1f})",
            f"{g['median']:.1f} (min {g['min']:.1f})",
            f"{r['added_ns']:+.1f}",
            f"{r['ratio']:.2f}",
        ))
    for r in result["faults"]:
        s = r["round_trip_us"]
        ratio = f"{r['ffiguard_ratio']:.2f}" if "ffiguard_ratio" in r else ""
        rows.append((r["name"], "n/a", f"{s['median']:.2f} us (min {s['min']:.2f})", "", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "| " + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ) + " |"

    table = [line(rows[0]), "|" + "|".join(
        "-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"]
    table += [line(row) for row in rows[1:]]

    out = [
        f"ffiguard {m['ffiguard']}: plain ctypes/cffi vs guarded, {result['rounds']} interleaved "
        f"rounds of {result['calls_per_round']} calls ({result['faults_per_round']} faults) "
        f"per variant (isolate rows: 5% of that; 1 MiB rows: 1%; shield mprotect rows: 0.1% "
        f"per MiB shielded); "
        f"median (min) over rounds; "
        f"loop overhead included, nothing subtracted",
        f"machine: {m['cpu']}, {m['cpus']} CPUs; {m['platform']}; {m['python']} ({m['compiler']})",
        "",
        *table,
    ]
    if result["goals"]:
        out.append("")
        out.append("goals: " + "; ".join(
            f"{g['what']}: {g['value']} {'met' if g['met'] else 'NOT MET'}" for g in result["goals"]))
    for reason in result.get("skipped", []):
        out.append(f"skipped: {reason}")
    out.append(f"({result['seconds']:.1f} s; ffiguard.stats() after the run: {result['stats']})")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ffiguard.bench",
        description="Time plain vs guarded foreign calls and the fault -> exception round trip, "
                    "interleaved in one run; report medians (and minima).",
    )
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds (default 25)")
    parser.add_argument("--calls", type=int, default=100_000,
                        help="calls per timed loop (default 100000)")
    parser.add_argument("--faults", type=int, default=2_000,
                        help="faulting calls per timed loop (default 2000)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-isolate", action="store_true",
                        help="leave out the isolate-mode rows (they start a helper process)")
    parser.add_argument("--no-shield", action="store_true",
                        help="leave out the shield rows (they shield up to 1 GiB)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.faults < 1:
        parser.error("--rounds, --calls and --faults must be >= 1")

    result = run(args.rounds, args.calls, args.faults, isolate=not args.no_isolate,
                 shield=not args.no_shield)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
