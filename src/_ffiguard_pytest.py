"""ffiguard's pytest entry point (`pytest --ffiguard`, `pytest -p ffiguard`).

Top-level on purpose: pytest imports every entry-point plugin at start-up, and importing
anything inside the ffiguard package runs ffiguard/__init__.py, which installs signal
handlers. This module only declares the options; ffiguard is imported, and guarding
switched on, only when asked. The plugin itself: ffiguard/pytest_plugin.py.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("ffiguard", "ffiguard: foreign faults become test failures")
    group.addoption("--ffiguard", action="store_true", default=False,
                    help="guard every library loaded through ctypes/cffi: a segfault (or "
                         "SIGBUS, SIGILL, SIGFPE, abort) in a test fails that test with the "
                         "native report, and the session goes on. Same as -p ffiguard.")
    group.addoption("--ffiguard-signals", metavar="SPEC", default=None,
                    help="signals to trap with --ffiguard, e.g. SEGV,BUS (default: all of "
                         "SEGV,BUS,ILL,FPE,ABRT)")
    group.addoption("--ffiguard-on-fault", choices=("raise", "quarantine", "exit"),
                    default=None,
                    help="what happens to a library after a fault (default raise: it can be "
                         "called again; quarantine: later calls raise LibraryQuarantined; "
                         "exit: end the process with status 70)")
    group.addoption("--ffiguard-timeout", metavar="SECONDS", type=float, default=None,
                    help="with --ffiguard: a foreign call that runs longer is stopped "
                         "(ForeignTimeout): the hung test fails with the report of where it "
                         "was, and the session goes on")


def _wanted(namespace):
    """--ffiguard, or -p ffiguard (with the entry point installed, -p only names an
    already loaded plugin, so it is read here as the request)."""
    plugins = getattr(namespace, "plugins", None) or ()
    return bool(getattr(namespace, "ffiguard", False)) or any(
        p in ("ffiguard", "_ffiguard_pytest", "ffiguard.pytest_plugin") for p in plugins)


def _from_run():
    """Under `python -m ffiguard run`: it sets FFIGUARD_RUN to its own pid. This pytest
    process (that pid) and the pytest-xdist workers it starts (they inherit the
    variable, xdist sets PYTEST_XDIST_WORKER, and their parent is that pid) switch the
    plugin on; a pytest the program starts as a subprocess, and its workers, do not."""
    import os

    value = os.environ.get("FFIGUARD_RUN")
    return bool(value) and (value == str(os.getpid()) or (
        "PYTEST_XDIST_WORKER" in os.environ and value == str(os.getppid())))


def _activate(config, namespace, from_run=False):
    from ffiguard import pytest_plugin

    pytest_plugin.activate(config, namespace, from_run)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # as early as a plugin can act: before conftests and test modules load libraries
    namespace = early_config.known_args_namespace
    if _wanted(namespace) or _from_run():
        _activate(early_config, namespace, from_run=not _wanted(namespace))


def pytest_configure(config):
    if _wanted(config.option) or _from_run():
        _activate(config, config.option, from_run=not _wanted(config.option))
