"""pytest plugin: a foreign fault in a test fails that test, with the native report, and
the session goes on.

The `pytest11` entry point "ffiguard" is the top-level module `_ffiguard_pytest`, not
this one: pytest loads entry points always, and importing anything inside the ffiguard
package runs ffiguard/__init__.py, which installs the signal handlers. That module only
declares the options and, when asked, imports this one and calls activate(); a plain
`pytest` imports nothing of ffiguard and patches nothing. Asking is either of

    pytest --ffiguard ...
    pytest -p ffiguard ...      (also in addopts / PYTEST_ADDOPTS)

When active, ffiguard.install() runs before the initial conftests are loaded (or at
pytest_configure, if this plugin is loaded late), so every library that test modules
and conftests load through ctypes or cffi is guarded. A test whose setup, call or
teardown raises a ForeignFault (or an exception caused by one) fails like any test
raising an exception; its report gets a section "ffiguard native report" holding
e.report(), and a user property ("ffiguard_fault", "SIGSEGV") that survives
serialization, so with pytest-xdist the controller counts its workers' faults. The
terminal summary says how many tests faulted, with their signals.

Options: --ffiguard-signals SPEC (which signals are trapped: "SEGV,BUS"; default all),
--ffiguard-on-fault raise|quarantine|exit (default raise: the next test may call the
library again; exit ends the worker/session at the fault with status 70),
--ffiguard-timeout SECONDS (a foreign call running longer is stopped: the hung test fails
with a ForeignTimeout and its report, and the session goes on).
"""
import re

import pytest

from ffiguard import run  # imported only once the plugin is asked for (see above)

SECTION = "ffiguard native report"
PROPERTY = "ffiguard_fault"
PLUGIN_NAME = "ffiguard-session"


def activate(config, namespace):
    """Switch guarding on for this pytest process and register the session plugin
    (once). Called by _ffiguard_pytest when --ffiguard or -p ffiguard was given."""
    if config.pluginmanager.has_plugin(PLUGIN_NAME):
        return
    import ffiguard

    signals = getattr(namespace, "ffiguard_signals", None)
    on_fault = getattr(namespace, "ffiguard_on_fault", None)
    timeout = getattr(namespace, "ffiguard_timeout", None)  # interrupt (issue 16)
    owner = not ffiguard.installed()  # e.g. not already on under `ffiguard run -m pytest`
    try:
        run.activate(signals=signals, on_fault=on_fault, timeout=timeout)
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

    def pytest_report_header(self, config):
        from ffiguard import signals

        return "ffiguard %s: every library loaded through ctypes/cffi is guarded (trapping %s)" % (
            self.ffiguard.__version__, ",".join(s.name for s in signals.TRAPPED) or "nothing")

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
        n = len(self.faulted)
        if not n and not self.collection:
            tr.write_line("ffiguard: no test faulted in foreign code")
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
        tr.write_line("ffiguard: %d test%s faulted in foreign code%s" % (
            n, "" if n == 1 else "s",
            " (%s)" % _by_signal(sig for sig, _ in self.faulted.values()) if n else ""))

    def pytest_unconfigure(self, config):
        if self.owner:
            self.ffiguard.uninstall()


def _fault_of(call):
    return None if call.excinfo is None else run.find_fault(call.excinfo.value)


def _by_signal(names):
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join("%s: %d" % kv for kv in sorted(counts.items()))
