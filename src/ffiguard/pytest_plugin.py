"""pytest plugin: a foreign fault in a test fails that test, with the native report, and
the session goes on.

The `pytest11` entry point "ffiguard" is the top-level module `_ffiguard_pytest`, not
this one: pytest loads entry points always, and importing anything inside the ffiguard
package runs ffiguard/__init__.py, which installs the signal handlers. That module only
declares the options and, when asked, imports this one and calls activate(); a plain
`pytest` imports nothing of ffiguard and patches nothing. Asking is either of

    pytest --ffiguard ...
    pytest -p ffiguard ...      (also in addopts / PYTEST_ADDOPTS)

`python -m ffiguard run -m pytest ...` switches it on too, for that pytest process and
its pytest-xdist workers (`-n N`): `run` sets FFIGUARD_RUN to its own pid (see run.py),
and _ffiguard_pytest activates the plugin in the process with that pid and in any xdist
worker that inherits the variable, with run's --signals/--on-fault
(FFIGUARD_RUN_SIGNALS, FFIGUARD_RUN_ON_FAULT). So the whole run is guarded, workers
included, without --subprocesses.

When active, ffiguard.install() runs before the initial conftests are loaded (or at
pytest_configure, if this plugin is loaded late), so every library that test modules
and conftests load through ctypes or cffi is guarded. A test whose setup, call or
teardown raises a ForeignFault (or an exception caused by one) fails like any test
raising an exception; its report gets a section "ffiguard native report" holding
e.report(), and a user property ("ffiguard_fault", "SIGSEGV") that survives
serialization, so with pytest-xdist the controller counts its workers' faults. The
terminal summary says how many tests faulted, with their signals.

What the user is told about coverage: the header says what is guarded so far and what
is not; the end of the session says which libraries and functions were guarded (counts
and a few names) and names the modules imported unguarded, with why (compiled cffi
modules: ffiguard.unguarded(), through ffiguard.inventory). xdist workers send theirs to
the controller (workeroutput).

Faults nobody could see: a ForeignFault raised where Python cannot propagate it (a
library call in __del__, a weakref callback, ...) goes to sys.unraisablehook. While the
session runs, the plugin wraps that hook (chaining to pytest's own, which still turns it
into a PytestUnraisableExceptionWarning), and the summary lists each such fault with the
test during which it happened.

Options: --ffiguard-signals SPEC (which signals are trapped: "SEGV,BUS"; default all),
--ffiguard-on-fault raise|quarantine|exit (default raise: the next test may call the
library again; exit ends the worker/session at the fault with status 70),
--ffiguard-timeout SECONDS (a foreign call running longer is stopped: the hung test fails
with a ForeignTimeout and its report, and the session goes on).
"""
import os
import re
import sys

import pytest

from ffiguard import inventory, run  # imported only once the plugin is asked for (see above)

SECTION = "ffiguard native report"
PROPERTY = "ffiguard_fault"
PLUGIN_NAME = "ffiguard-session"
WORKER_KEY = "ffiguard"  # in an xdist worker's workeroutput: its inventory and unraisables


def activate(config, namespace, from_run=False):
    """Switch guarding on for this pytest process and register the session plugin
    (once). Called by _ffiguard_pytest when --ffiguard or -p ffiguard was given, or
    (from_run) under `python -m ffiguard run`."""
    if config.pluginmanager.has_plugin(PLUGIN_NAME):
        return
    import ffiguard

    signals = getattr(namespace, "ffiguard_signals", None)
    on_fault = getattr(namespace, "ffiguard_on_fault", None)
    timeout = getattr(namespace, "ffiguard_timeout", None)  # interrupt (issue 16)
    interruptible = False
    if from_run:  # run's own options, for its xdist workers
        signals = signals or os.environ.get(run.RUN_SIGNALS) or None
        on_fault = on_fault or os.environ.get(run.RUN_ON_FAULT) or None
        if timeout is None and os.environ.get(run.RUN_TIMEOUT):
            timeout = float(os.environ[run.RUN_TIMEOUT])
        interruptible = os.environ.get(run.RUN_INTERRUPTIBLE) == "1"
    owner = not ffiguard.installed()  # e.g. not already on under `ffiguard run -m pytest`
    try:
        run.activate(signals=signals, on_fault=on_fault, timeout=timeout,
                     interruptible=interruptible)
    except (ValueError, RuntimeError) as e:
        raise pytest.UsageError("ffiguard: %s" % e)
    config.pluginmanager.register(_Session(ffiguard, owner), PLUGIN_NAME)


class _Session:
    """The active plugin: registered only when asked for."""

    def __init__(self, ffiguard, owner):
        self.ffiguard = ffiguard
        self.owner = owner  # uninstall at the end only what we installed
        self.faulted = {}  # nodeid -> (signal name, outcome), in order
        self.collection = {}  # nodeid -> signal name: faults while collecting (importing)
        self.unraisable = []  # [(nodeid or None, signal name, where)]: faults in __del__...
        self.current = None  # the nodeid of the test running now
        self.workers = []  # xdist workers' WORKER_KEY dicts
        self.previous_hook = None  # sys.unraisablehook before ours, while ours is on

    def pytest_report_header(self, config):
        from ffiguard import signals

        head = ("ffiguard %s: on (trapping %s): libraries loaded through ctypes and cffi "
                "and compiled cffi modules are guarded (what is not: below)" % (
                    self.ffiguard.__version__,
                    ",".join(s.name for s in signals.TRAPPED) or "nothing"))
        return [head] + ["ffiguard: " + line for line in inventory.lines(inventory.take())]

    # ---- faults raised where they cannot propagate: sys.unraisablehook ----

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session):
        # after every pytest_configure: pytest's own hook is in place; ours chains to it
        self._wrap_unraisablehook()

    def _wrap_unraisablehook(self):
        previous = sys.unraisablehook
        if getattr(previous, "__ffiguard_session__", None) is self:
            return
        session = self

        def hook(unraisable):
            session._note_unraisable(unraisable)
            return previous(unraisable)

        hook.__ffiguard_session__ = self
        self.previous_hook = previous
        sys.unraisablehook = hook

    def _note_unraisable(self, unraisable):
        try:
            fault = run.find_fault(unraisable.exc_value)
            if fault is None:
                return
            if unraisable.object is None and unraisable.err_msg:
                where = unraisable.err_msg  # 3.14+: the message names the object itself
            else:
                where = "%s: %s" % (unraisable.err_msg or "Exception ignored in",
                                    _short_repr(unraisable.object))
            self.unraisable.append((self.current, fault.signal.name, where))
        except Exception:  # never break the hook chain
            pass

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self._wrap_unraisablehook()  # pytest < 8.4 puts its own per phase: see below
        try:
            yield
        finally:
            self.current = None

    def _phase(self):
        # pytest < 8.4 sets its own unraisablehook for each phase (not chaining to the
        # previous one): wrap it innermost for the phase, then put it back.
        previous = sys.unraisablehook
        if getattr(previous, "__ffiguard_session__", None) is self:
            return None
        self._wrap_unraisablehook()
        return previous

    def _unphase(self, previous):
        if previous is not None and getattr(sys.unraisablehook, "__ffiguard_session__", None) is self:
            sys.unraisablehook = previous

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_setup(self, item):
        previous = self._phase()
        yield
        self._unphase(previous)

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_call(self, item):
        previous = self._phase()
        yield
        self._unphase(previous)

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item):
        previous = self._phase()
        yield
        self._unphase(previous)

    def pytest_sessionfinish(self, session):
        config = session.config
        if hasattr(config, "workerinput"):  # an xdist worker: tell the controller
            config.workeroutput[WORKER_KEY] = {
                "inventory": inventory.as_dict(inventory.take()),
                "unraisable": [list(u) for u in self.unraisable]}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
        if data:
            self.workers.append(data)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        fault = _fault_of(call)
        if fault is not None:
            report = outcome.get_result()
            report.sections.append((SECTION, run.report_text(fault)))
            # a ForeignTimeout (--ffiguard-timeout) has no signal
            report.user_properties.append((PROPERTY, fault.signal.name if fault.signal else "timeout"))

    def pytest_exception_interact(self, node, call, report):
        # the one hook that sees a collection error's exception (a library call faulting
        # while a test module is imported) before its report is logged or sent by xdist
        if getattr(report, "when", None) == "collect":
            fault = _fault_of(call)
            if fault is not None:
                report.sections.append((SECTION, run.report_text(fault)))

    def pytest_collectreport(self, report):
        for title, text in report.sections:
            if title == SECTION:
                found = re.search(r"\b(SIG[A-Z]+)\b", text)
                self.collection[report.nodeid] = found.group(1) if found else "?"

    def pytest_runtest_logreport(self, report):
        # runs in the controller for its workers' reports too (user_properties travel)
        for name, value in report.user_properties:
            if name == PROPERTY and report.nodeid not in self.faulted:
                self.faulted[report.nodeid] = (value, report.outcome)

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        unraisable = list(self.unraisable)
        for data in self.workers:
            unraisable.extend(tuple(u) for u in data.get("unraisable", ()))
        inv = inventory.merge([inventory.as_dict(inventory.take())] +
                              [d["inventory"] for d in self.workers if "inventory" in d])
        n = len(self.faulted)
        if not n and not self.collection and not unraisable:
            tr.write_line("ffiguard: no test faulted in foreign code")
            for line in inventory.lines(inv):
                tr.write_line("ffiguard: " + line)
            return
        tr.section("ffiguard", sep="=", red=True, bold=True)
        for nodeid, sig in self.collection.items():
            tr.write_line("FAULTED %s - %s (error during collection)" % (nodeid, sig))
        for nodeid, (sig, outcome) in self.faulted.items():
            tr.write_line("FAULTED %s - %s (%s)" % (nodeid, sig, outcome))
        if self.collection:
            c = len(self.collection)
            tr.write_line("ffiguard: %d module%s faulted in foreign code while collected (%s)" % (
                c, "" if c == 1 else "s", _by_signal(self.collection.values())))
        for nodeid, sig, where in unraisable:
            tr.write_line("FAULTED %s - %s (raised where it could not propagate: %s)" % (
                nodeid or "(between tests)", sig, where))
        tr.write_line("ffiguard: %d test%s faulted in foreign code%s" % (
            n, "" if n == 1 else "s",
            " (%s)" % _by_signal(sig for sig, _ in self.faulted.values()) if n else ""))
        if unraisable:
            u = len(unraisable)
            tr.write_line("ffiguard: %d fault%s in foreign code raised where %s could not "
                          "propagate (__del__, callbacks: \"Exception ignored\") (%s)" % (
                              u, "" if u == 1 else "s", "it" if u == 1 else "they",
                              _by_signal(sig for _, sig, _ in unraisable)))
        for line in inventory.lines(inv):
            tr.write_line("ffiguard: " + line)

    def pytest_unconfigure(self, config):
        if getattr(sys.unraisablehook, "__ffiguard_session__", None) is self:
            sys.unraisablehook = self.previous_hook
        if self.owner:
            self.ffiguard.uninstall()


def _fault_of(call):
    return None if call.excinfo is None else run.find_fault(call.excinfo.value)


def _short_repr(obj, limit=80):
    try:
        text = repr(obj)
    except Exception:
        text = "<%s object>" % type(obj).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _by_signal(names):
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join("%s: %d" % kv for kv in sorted(counts.items()))
