"""Which signals are trapped, and keeping our handlers first in line.

The handlers are installed when ffiguard is imported. Whatever was installed before
(faulthandler, a JVM, a Python-level handler) is chained to for every fault that is
not a guarded foreign call's.

faulthandler replaces signal handlers when enabled and puts back what it saved when
disabled, which would silently take ffiguard out of the chain (pytest enables it for
every session). So faulthandler.enable/disable are wrapped to put our handlers back on
top afterwards, chaining to faulthandler while it is enabled.
"""
import faulthandler
import functools
import signal
import threading

from . import _core

ALL = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)
TRAPPED = ALL  # what is trapped now: see select()

_before_faulthandler = None  # our chained handlers from before faulthandler.enable()
# select() and the faulthandler wrappers read and change TRAPPED, _before_faulthandler and
# the installed handlers in several steps: one at a time (no GIL to rely on in
# free-threaded builds; _core's own calls are each atomic).
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
    as it would without ffiguard."""
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
    """Put ffiguard's handlers back on top of any installed since; return how many moved."""
    return _core.refresh()


def _wrap_faulthandler():
    enable, disable = faulthandler.enable, faulthandler.disable
    if getattr(enable, "__ffiguard__", False):
        return

    @functools.wraps(enable)
    def enable_then_refresh(*args, **kwargs):
        global _before_faulthandler
        with _lock:
            if _before_faulthandler is None:
                _before_faulthandler = _core.previous_snapshot()
            result = enable(*args, **kwargs)
            _core.refresh()
        return result

    @functools.wraps(disable)
    def disable_then_refresh(*args, **kwargs):
        global _before_faulthandler
        with _lock:
            result = disable(*args, **kwargs)
            if _core.refresh() == 0 and _before_faulthandler is not None:
                # faulthandler put back what it saved, which was our own handler: chain to
                # what came before faulthandler, not to faulthandler's now idle handler.
                _core.previous_restore(_before_faulthandler)
            _before_faulthandler = None
        return result

    enable_then_refresh.__ffiguard__ = disable_then_refresh.__ffiguard__ = True
    faulthandler.enable, faulthandler.disable = enable_then_refresh, disable_then_refresh


if _core.SUPPORTED:
    install()
    _wrap_faulthandler()
