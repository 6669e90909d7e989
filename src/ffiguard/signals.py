"""Which signals are trapped, and where ffiguard's handler stands among the others.

The handlers are installed when ffiguard is imported, on top of whatever is there
(faulthandler, a JVM, a Python-level handler): that previous handler gets every signal
that is not a guarded foreign call's, as the kernel would give it.

A handler installed after ffiguard's (a WebAssembly engine, a JIT, a JVM: runtimes that
handle faults in code they run) stays on top and is expected to chain to ffiguard's;
nothing puts ffiguard back on top of it, not refresh(), select() or faulthandler.

faulthandler is the exception: it replaces signal handlers when enabled and puts back
what it saved when disabled, and it only reports, never handles, a fault. pytest
enables it for every session. So faulthandler.enable/disable are wrapped: where the
real call replaced ffiguard's handler, ffiguard's goes back on top, chaining to
faulthandler while it is enabled and to what came before it once disabled.
docs/design.md, "Living with other handlers", has the details and the reasons.
"""
import faulthandler
import functools
import signal
import threading

from . import _core

ALL = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)
TRAPPED = ALL  # what is trapped now: see select()

_faulthandler_lock = threading.Lock()  # one enable/disable followed at a time
# select() reads and changes TRAPPED and the installed handlers in several steps: one at a
# time (no GIL to rely on in free-threaded builds; _core's own calls are each atomic).
_lock = threading.RLock()


def install():
    with _lock:
        _core.install([int(s) for s in TRAPPED])


def _check_trappable(sig, shown):
    if sig not in ALL:
        raise ValueError("ffiguard traps %s; not %s" % (", ".join(s.name for s in ALL), shown))


def parse(spec):
    """Signals from a comma-separated spec: "SEGV,BUS", "SIGSEGV", "11", "all", "none"."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return ()
    if spec.lower() == "all":
        return tuple(sorted(ALL))
    chosen = []
    for word in spec.split(","):
        word = word.strip().upper()
        try:
            sig = signal.Signals(int(word)) if word.isdigit() else signal.Signals[
                word if word.startswith("SIG") else "SIG" + word]
        except (KeyError, ValueError):
            sig = None
        _check_trappable(sig, repr(word))
        if sig not in chosen:
            chosen.append(sig)
    return tuple(sorted(chosen))


def select(signals):
    """Trap exactly these signals (signal numbers, Signals, or a spec for parse()).

    A signal no longer trapped gets back the handler installed before ffiguard's (or
    its default action): a fault of that kind in a guarded call then kills the process
    as it would without ffiguard. A chosen signal whose handler is still in the chain
    keeps its place: a handler installed after ffiguard's stays on top."""
    global TRAPPED
    chosen = parse(signals) if isinstance(signals, str) else tuple(
        sorted(signal.Signals(s) for s in set(signals)))
    for s in chosen:
        _check_trappable(s, s.name)
    with _lock:
        for s in ALL:
            if s not in chosen:
                _core.untrap(int(s))
        _core.install([int(s) for s in chosen])
        TRAPPED = chosen
    return chosen


def refresh():
    """Put ffiguard's handler back where it was taken out outright (SIG_DFL or SIG_IGN
    installed over it); return how many signals needed it.

    Never on top of another handler: one installed after ffiguard's stays first in line
    and is expected to chain to it (a runtime handling its own faults would otherwise
    lose them to ffiguard)."""
    return _core.refresh()


def _wrap_faulthandler():
    enable, disable = faulthandler.enable, faulthandler.disable
    if getattr(enable, "__ffiguard__", False):
        return

    def follow(real):
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            with _faulthandler_lock:
                before = _core.handlers()
                try:
                    return real(*args, **kwargs)
                finally:
                    _core.after_faulthandler(before, faulthandler.is_enabled())
        wrapper.__ffiguard__ = True
        return wrapper

    faulthandler.enable, faulthandler.disable = follow(enable), follow(disable)


def _wrap_pthread_sigmask():
    """After a recovered fault the thread gets back the signal mask its guarded calls
    start with, which the core reads once per thread: keep it current when the program
    changes the mask (foreign code that blocks a signal and faults must not leave it
    blocked, but a mask the program chose must stay)."""
    original = signal.pthread_sigmask
    if getattr(original, "__ffiguard__", False):
        return

    @functools.wraps(original)
    def pthread_sigmask(how, mask):
        result = original(how, mask)
        _core.note_mask()
        return result

    pthread_sigmask.__ffiguard__ = True
    signal.pthread_sigmask = pthread_sigmask


if _core.SUPPORTED:
    install()
    _wrap_faulthandler()
    _wrap_pthread_sigmask()
