"""`python -m ffiguard run`: run an existing program with every foreign call guarded.

    python -m ffiguard run [options] script.py [args...]
    python -m ffiguard run [options] -m module [args...]
    python -m ffiguard run [options] -c command [args...]

Guard-everything (ffiguard.install()) is on before the program's first line. The program
then runs as `python script.py` / `python -m module` would run it: a fresh `__main__`
module in sys.modules (``__name__``, ``__file__``, ``__spec__``, ``__loader__``,
``__package__``, and ``__cached__``/``__annotations__`` on the versions where python
sets them), ``sys.argv`` = [script or module path, args...] (["-c", args...] for -c), ``sys.path[0]`` =
the script's directory (symlinks resolved) or, for -m, the current directory, for -c ""
(untouched under ``-P``/PYTHONSAFEPATH). Exit codes are python's:
sys.exit(n) / SystemExit("msg") propagate unchanged, an uncaught exception prints its
traceback (through sys.excepthook, starting at the program's first frame: none of ours
or runpy's) and exits 1, an uncaught KeyboardInterrupt ends the process by SIGINT.

One difference on purpose: an uncaught exception that is (or was caused by) a
ForeignFault prints its traceback, then the fault's full report, and exits with status
EXIT_FAULT (70, EX_SOFTWARE, as on_fault="exit"): a foreign fault is told apart from an
ordinary error and from a signal death. The process ends as after any uncaught exception
(finally blocks have run, atexit handlers run); `--on-fault exit` ends it at the fault
instead, running nothing more.

Options come before the target; everything after the script or `-m module` is the
program's, untouched. This module also holds what the FFIGUARD environment variable
(ffiguard/_startup/sitecustomize.py) and the pytest plugin use to switch guarding on:
activate(), activate_from_environment(), environment().
"""
import os
import sys

__all__ = ["EXIT_FAULT", "main", "activate", "activate_from_environment", "environment",
           "startup_dir", "find_fault"]

EXIT_FAULT = 70  # EX_SOFTWARE, the same status as on_fault="exit"

# Set by `run` (when it installs) in the program's environment: its pid, and its
# --signals/--on-fault. The pytest plugin (_ffiguard_pytest) switches itself on in the
# pytest process with that pid and in the pytest-xdist workers it starts (which inherit
# the variables), so `run -m pytest -n 2` guards the workers too.
RUN_PID = "FFIGUARD_RUN"
RUN_SIGNALS = "FFIGUARD_RUN_SIGNALS"
RUN_ON_FAULT = "FFIGUARD_RUN_ON_FAULT"
RUN_INTERRUPTIBLE = "FFIGUARD_RUN_INTERRUPTIBLE"  # "1" for --interruptible
RUN_TIMEOUT = "FFIGUARD_RUN_TIMEOUT"  # --timeout's seconds

USAGE = """\
usage: python -m ffiguard run [options] script.py [args...]
       python -m ffiguard run [options] -m module [args...]
       python -m ffiguard run [options] -c command [args...]"""

HELP = USAGE + """

Run a Python program with every library it loads through ctypes or cffi guarded
(ffiguard.install() before its first line). sys.argv, __main__, exit codes and
tracebacks are as with `python script.py` / `python -m module` / `python -c`. An uncaught
ForeignFault prints the traceback and the fault's full report, and exits with
status 70.

options (before the script, -m or -c; what follows belongs to the program):
  --signals SPEC       signals to trap, e.g. SEGV,BUS (default: all of
                       SEGV,BUS,ILL,FPE,ABRT; "none" traps nothing)
  --on-fault POLICY    raise (default), quarantine or exit: the default policy of
                       every guarded library (see ffiguard.set_default_policy)
  --interruptible      Ctrl-C stops a hung foreign call (KeyboardInterrupt with
                       the report of where it was)
  --timeout SECONDS    stop any guarded call that runs longer (ForeignTimeout)
  --no-install         do not guard every library (only ffiguard.CDLL and friends
                       are guarded); the exit status and report stay
  --shield             shield the interpreter's heap (ffiguard.shield_interpreter()):
                       guarded calls cannot write Python objects made from then
                       on; needs protection keys (refused, status 2, elsewhere);
                       this process only, not --subprocesses' children
  --subprocesses       also guard Python subprocesses of the program: sets
                       FFIGUARD=1 (and FFIGUARD_SIGNALS/FFIGUARD_ON_FAULT) and
                       puts ffiguard's startup directory on PYTHONPATH for them
  -h, --help           show this help and exit
"""

_TRUE_OFF = ("", "0", "no", "false", "off")


# ---- switching guarding on (shared by run, the environment variable, the plugin) --------


def activate(signals=None, on_fault=None, install=True, shield=False, interruptible=False,
             timeout=None):
    """Import ffiguard, trap `signals` (a spec like "SEGV,BUS", or None for all), set
    the default on_fault policy, and guard every library loaded from now on;
    `interruptible`: Ctrl-C stops guarded calls, `timeout`: seconds per call; with
    `shield`, ffiguard.shield_interpreter() too (ShieldUnavailable where it cannot)."""
    import ffiguard
    from ffiguard import signals as _signals

    if signals is not None:
        _signals.select(signals)
    if on_fault is not None:
        ffiguard.set_default_policy(on_fault)
    if interruptible:  # interrupt (issue 16): also for ffiguard.CDLL under --no-install
        ffiguard.set_default_interruptible(True)
    if install:
        ffiguard.install(timeout=timeout)
    if shield:  # shield (issue 13): run --shield
        ffiguard.shield_interpreter()
    return ffiguard


def activate_from_environment(environ=None):
    """Switch guarding on if FFIGUARD is set to something other than ""/0/no/false/off,
    with FFIGUARD_SIGNALS and FFIGUARD_ON_FAULT as the options. Returns True if it did.
    Also makes an uncaught ForeignFault print its full report after the traceback."""
    env = os.environ if environ is None else environ
    if env.get("FFIGUARD", "").strip().lower() in _TRUE_OFF:
        return False
    on_fault = env.get("FFIGUARD_ON_FAULT") or None
    if on_fault is not None:
        from ffiguard.policy import check_on_fault
        check_on_fault(on_fault)
    activate(signals=env.get("FFIGUARD_SIGNALS") or None, on_fault=on_fault)
    _install_report_hook()
    return True


def startup_dir():
    """The directory holding ffiguard's sitecustomize.py (put it first on PYTHONPATH)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup")


def environment(signals=None, on_fault=None, base=None):
    """The variables that make Python processes started with them guard everything:
    {"FFIGUARD": "1", "PYTHONPATH": startup dir + the existing PYTHONPATH, ...}."""
    base = os.environ if base is None else base
    env = {"FFIGUARD": "1"}
    if signals is not None:
        env["FFIGUARD_SIGNALS"] = signals
    if on_fault is not None:
        env["FFIGUARD_ON_FAULT"] = on_fault
    here = startup_dir()
    rest = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    env["PYTHONPATH"] = os.pathsep.join([here] + rest)
    return env


def find_fault(exc):
    """The ForeignFault that exc is, or was caused by (__cause__/__context__), or None."""
    from ffiguard import ForeignFault

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ForeignFault):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return None


def report_text(fault):
    """fault.report(), or, should making it fail, the one-line message and why: the
    report is best effort, the failure it explains stands anyway."""
    try:
        return fault.report()
    except Exception as e:
        return "%s: %s\n(the full report failed: %r)\n" % (type(fault).__name__, fault, e)


def _write_report(fault, trailer):
    text = report_text(fault)
    try:
        sys.stderr.write("\n" + text.rstrip("\n") + "\n" + trailer)
        sys.stderr.flush()
    except Exception:
        pass


def _install_report_hook():
    """sys.excepthook prints the full report after an uncaught ForeignFault's traceback
    (for programs guarded through the environment variable; the exit status stays 1)."""
    previous = sys.excepthook
    if getattr(previous, "__ffiguard_report__", False):
        return

    def excepthook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        fault = find_fault(exc)
        if fault is not None:
            _write_report(fault, "\nffiguard: uncaught %s from a foreign call (FFIGUARD=%s).\n"
                          % (type(fault).__name__, os.environ.get("FFIGUARD", "")))

    excepthook.__ffiguard_report__ = True
    sys.excepthook = excepthook


# ---- the command line -----------------------------------------------------------------


class UsageError(Exception):
    pass


class TargetError(Exception):
    """The program could not be found or loaded: python's message, exit status."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def parse(argv):
    """Split `run`'s arguments: (options dict, "script"|"module"|"command", target,
    program args)."""
    opts = {"signals": None, "on_fault": None, "install": True, "subprocesses": False,
            "help": False, "shield": False, "interruptible": False, "timeout": None}
    valued = {"--signals": "signals", "--on-fault": "on_fault", "--timeout": "timeout"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            opts["help"] = True
            return opts, None, None, []
        if arg == "--no-install":
            opts["install"] = False
        elif arg == "--shield":  # shield (issue 13)
            opts["shield"] = True
        elif arg == "--subprocesses":
            opts["subprocesses"] = True
        elif arg == "--interruptible":
            opts["interruptible"] = True
        elif arg.split("=", 1)[0] in valued:
            name, eq, value = arg.partition("=")
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError("%s needs a value" % name)
                value = argv[i]
            opts[valued[name]] = value
        elif arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module = arg[2:]
            if not module:
                i += 1
                if i >= len(argv):
                    raise UsageError("-m needs a module name")
                module = argv[i]
            return opts, "module", module, argv[i + 1:]
        elif arg == "-c" or (arg.startswith("-c") and not arg.startswith("--")):
            command = arg[2:]
            if not command:
                i += 1
                if i >= len(argv):
                    raise UsageError("-c needs a command")  # python: "Argument expected"
                command = argv[i]
            return opts, "command", command, argv[i + 1:]
        elif arg == "--":
            if i + 1 >= len(argv):
                raise UsageError("no script after --")
            return opts, "script", argv[i + 1], argv[i + 2:]
        elif arg.startswith("-") and arg != "-":
            raise UsageError("unknown option %r (options go before the script, -m or -c)" % arg)
        else:
            return opts, "script", arg, argv[i + 1:]
        i += 1
    raise UsageError("no script, -m module or -c command given")


def _main_attrs(cached, **attrs):
    """The __main__ module's attributes as python sets them on this version: `attrs`,
    plus ``__cached__`` before 3.15 (3.15 no longer sets it), plus an empty
    ``__annotations__`` before 3.14 (python's own __main__ had one until PEP 649)."""
    if sys.version_info < (3, 15):
        attrs["__cached__"] = cached
    if sys.version_info < (3, 14):
        attrs["__annotations__"] = {}
    return attrs


def _command(source):
    """(code, main module attributes) for `python -c source`: the code is "<string>",
    __main__ has no __file__, its loader is BuiltinImporter, as python's."""
    import importlib.machinery

    import linecache

    code = compile(source, "<string>", "exec", dont_inherit=True)
    if sys.version_info >= (3, 13):  # python -c keeps the source for its tracebacks
        linecache.cache["<string>"] = (len(source), None,
                                       [line + "\n" for line in source.splitlines()], "<string>")
    attrs = dict(__loader__=importlib.machinery.BuiltinImporter, __spec__=None,
                 __package__=None)
    if sys.version_info < (3, 14):
        attrs["__annotations__"] = {}
    return code, attrs


def _script(path):
    """(code, main module attributes, sys.path[0], argv0) for `python path`."""
    import importlib.machinery

    if os.path.isdir(path) or _is_zip(path):
        # `python dir_or_zip`: run its __main__.py with the directory first on sys.path.
        spec = importlib.machinery.PathFinder.find_spec("__main__", [path])
        if spec is None or spec.loader is None:
            raise TargetError("can't find '__main__' module in %r" % path)
        code = spec.loader.get_code("__main__")
        attrs = _main_attrs(spec.cached, __file__=spec.origin, __loader__=spec.loader,
                            __spec__=spec, __package__="")
        return code, attrs, path, path
    abspath = os.path.join(os.getcwd(), path)  # as python: absolute, not normalized
    try:
        with open(abspath, "rb") as f:
            source = f.read()
    except OSError as e:
        raise TargetError("can't open file %r: [Errno %d] %s" % (abspath, e.errno, e.strerror),
                          status=2)
    if path.endswith(".pyc"):
        import marshal

        code = marshal.loads(source[16:])
        loader = importlib.machinery.SourcelessFileLoader("__main__", abspath)
    else:
        code = compile(source, abspath, "exec", dont_inherit=True)
        loader = importlib.machinery.SourceFileLoader("__main__", abspath)
    attrs = _main_attrs(None, __file__=abspath, __loader__=loader, __spec__=None,
                        __package__=None)
    return code, attrs, os.path.dirname(os.path.realpath(abspath)), path


def _is_zip(path):
    import zipfile

    try:
        return os.path.isfile(path) and zipfile.is_zipfile(path)
    except OSError:
        return False


def _module(name):
    """(code, main module attributes) for `python -m name`; errors worded as python's."""
    import importlib.util

    if name.startswith("."):
        raise TargetError("Relative module names not supported")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise TargetError("Error while finding module specification for %r (%s: %s)"
                          % (name, type(e).__name__, e))
    if spec is None:
        raise TargetError("No module named %s" % name)
    if spec.submodule_search_locations is not None:
        if name == "__main__" or name.endswith(".__main__"):
            raise TargetError("Cannot use package as __main__ module")
        try:
            return _module(name + ".__main__")
        except TargetError as e:
            raise TargetError("%s; %r is a package and cannot be directly executed" % (e, name))
    if spec.loader is None:
        raise TargetError("No code object available for %s" % name)
    try:
        code = spec.loader.get_code(spec.name)
    except ImportError as e:
        raise TargetError("%s: %s" % (type(e).__name__, e))
    if code is None:
        raise TargetError("No code object available for %s" % name)
    attrs = _main_attrs(spec.cached, __file__=spec.origin, __loader__=spec.loader,
                        __spec__=spec, __package__=spec.parent)
    return code, attrs


def _strip(tb, code):
    """The traceback from the program's own first frame on (ours and runpy's dropped)."""
    t = tb
    while t is not None and t.tb_frame.f_code is not code:
        t = t.tb_next
    return t if t is not None else tb


def _silent_excepthook(exc_type, exc, tb):
    pass


def execute(code, attrs):
    """Run `code` as the __main__ module. Returns the exit status for an uncaught
    ForeignFault; SystemExit and everything else leave as they would from python."""
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__dict__.update(attrs)
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        tb = _strip(e.__traceback__, code)
        e.__traceback__ = tb
        fault = find_fault(e)
        if fault is None:
            # python's own ending (status 1, or death by SIGINT for KeyboardInterrupt),
            # with the traceback printed here, from the program's first frame.
            sys.excepthook(type(e), e, tb)
            sys.excepthook = _silent_excepthook
            raise
        try:
            sys.stdout.flush()
        except Exception:
            pass
        sys.excepthook(type(e), e, tb)
        _write_report(fault, "\nffiguard run: uncaught %s from a foreign call; exit status %d.\n"
                      % (type(fault).__name__, EXIT_FAULT))
        return EXIT_FAULT
    return 0


def main(argv):
    """`python -m ffiguard run ...`; returns the exit status (or raises SystemExit)."""
    try:
        opts, kind, target, args = parse(argv)
        if opts["on_fault"] is not None:
            from ffiguard.policy import check_on_fault
            check_on_fault(opts["on_fault"])
        if opts["signals"] is not None:
            from ffiguard import signals as _signals

            _signals.parse(opts["signals"])
        if opts["timeout"] is not None:
            opts["timeout"] = float(opts["timeout"])
            if not opts["timeout"] > 0:
                raise ValueError("--timeout must be a positive number of seconds")
    except (UsageError, ValueError) as e:
        sys.stderr.write("%s\npython -m ffiguard run: error: %s\n" % (USAGE, e))
        return 2
    if opts["help"]:
        sys.stdout.write(HELP)
        return 0

    safe_path = getattr(sys.flags, "safe_path", False)
    try:
        if kind == "module":
            if not safe_path:
                sys.path[0] = os.getcwd()
            # python -m: argv[0] is "-m" while the module is looked up
            sys.argv = ["-m"] + list(args)
            # guard before the module's package is imported: that import is the program's
            _activate(opts)
            code, attrs = _module(target)
            sys.argv[0] = attrs["__file__"]
        elif kind == "command":
            if not safe_path:
                sys.path[0] = ""  # python -c: the current directory, as ""
            sys.argv = ["-c"] + list(args)
            _activate(opts)
            code, attrs = _command(target)
        else:
            code, attrs, path0, argv0 = _script(target)
            if not safe_path:
                sys.path[0] = path0
            elif attrs["__spec__"] is not None:  # a directory or zip always goes first
                sys.path.insert(0, path0)
            sys.argv = [argv0] + list(args)
            _activate(opts)
    except TargetError as e:
        sys.stderr.write("%s: %s\n" % (sys.executable, e))
        return e.status
    except RuntimeError as e:  # shield (issue 13): --shield where it cannot work
        from ffiguard import ShieldUnavailable
        if not isinstance(e, ShieldUnavailable):
            raise
        sys.stderr.write("python -m ffiguard run: error: --shield: %s\n" % e)
        return 2
    except SyntaxError as e:
        e.__traceback__ = None  # as python: the error alone, no traceback lines; status 1
        sys.excepthook(type(e), e, None)
        return 1
    _export_run(opts)
    if opts["subprocesses"]:
        os.environ.update(environment(opts["signals"], opts["on_fault"]))
    return execute(code, attrs)


def _activate(opts):
    activate(opts["signals"], opts["on_fault"], opts["install"], shield=opts["shield"],
             interruptible=opts["interruptible"], timeout=opts["timeout"])


def _export_run(opts):
    """RUN_PID & co. in the program's environment (see RUN_PID), or none of them."""
    for name in (RUN_PID, RUN_SIGNALS, RUN_ON_FAULT, RUN_INTERRUPTIBLE, RUN_TIMEOUT):
        os.environ.pop(name, None)
    if opts["install"]:
        os.environ[RUN_PID] = str(os.getpid())
        for name, value in ((RUN_SIGNALS, opts["signals"]), (RUN_ON_FAULT, opts["on_fault"]),
                            (RUN_INTERRUPTIBLE, "1" if opts["interruptible"] else None),
                            (RUN_TIMEOUT, None if opts["timeout"] is None else repr(opts["timeout"]))):
            if value is not None:
                os.environ[name] = value
