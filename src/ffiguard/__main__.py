"""`python -m ffiguard <command>`.

Commands are registered in COMMANDS: each is (name, help, add_arguments, run).
To add one (`run`, `doctor`, ...), write its two functions and append an entry;
run(args) returns the exit status. Command modules are imported only when the
command runs, so `--help` works even where the core cannot load.
"""

import argparse
import signal
import sys
from typing import List, Optional


# ---- demo ---------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=4, metavar="N",
                        help="native frames to show per fault with --short (default 4)")
    parser.add_argument("--short", action="store_true",
                        help="show the traceback notes instead of the full report")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="ANSI colours: auto (a terminal, and NO_COLOR unset), always, never")


def _demo_run(args: argparse.Namespace) -> int:
    from ffiguard import demo

    color = {"auto": None, "always": True, "never": False}[args.color]
    return demo.run(n_frames=max(args.frames, 0), full=not args.short, color=color)


# ---- doctor -------------------------------------------------------------------------


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _tool_version(path: str) -> str:
    import subprocess

    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return "%s (version unknown: %s)" % (path, type(e).__name__)
    lines = [l.strip() for l in (proc.stdout or proc.stderr).splitlines() if l.strip()]
    version = next((l for l in lines if any(c.isdigit() for c in l)), "?")
    return "%s (%s)" % (path, version)


# pkey_alloc / pkey_free syscall numbers (x86-64: MPK/PKU; AArch64: POE, Linux 6.12+).
_PKEY_SYSCALLS = {"x86_64": (330, 331), "aarch64": (289, 290)}


def protection_keys() -> str:
    """'yes' if pkey_alloc works here, else 'no (reason)': what the machine offers (the
    "shield:" line says what ffiguard's shield mode uses)."""
    import ctypes
    import os
    import platform

    numbers = _PKEY_SYSCALLS.get(platform.machine())
    if numbers is None:
        return "no (not checked on %s)" % platform.machine()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    key = libc.syscall(ctypes.c_long(numbers[0]), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if key < 0:
        err = ctypes.get_errno()
        return "no (pkey_alloc: %s)" % (os.strerror(err) if err else "failed")
    libc.syscall(ctypes.c_long(numbers[1]), ctypes.c_long(key))
    return "yes"


def doctor_lines() -> List[str]:
    import os
    import platform
    import signal
    import sysconfig

    lines = []
    add = lines.append
    uname = os.uname()
    add("ffiguard doctor: what this machine supports (paste this into bug reports)")
    try:
        import ffiguard
        from ffiguard import _core, signals, symbolize

        version, error = ffiguard.__version__, None
    except Exception as e:  # the core may not load: say so, do not crash
        version, error = "?", "%s: %s" % (type(e).__name__, e)
    add("ffiguard:        %s%s" % (version, " (import failed: %s)" % error if error else ""))
    add("architecture:    %s" % platform.machine())
    add("kernel:          %s %s %s" % (uname.sysname, uname.release, uname.version))
    libc = platform.libc_ver()
    add("libc:            %s" % (" ".join(x for x in libc if x) or "unknown"))
    ft = sysconfig.get_config_var("Py_GIL_DISABLED")
    gil = getattr(sys, "_is_gil_enabled", None)
    add("python:          %s %s (%s), %s" % (
        platform.python_implementation(), platform.python_version(), sys.executable,
        "free-threaded build%s" % (", GIL enabled at run time" if gil and gil() else "") if ft
        else "GIL build (not free-threaded)"))
    add("python build:    %s" % " ".join(platform.python_build()))
    add("protection keys: %s" % protection_keys())
    if error is None:
        add("guard:           %s" % ("supported (%s)" % _core.ARCH if _core.SUPPORTED
                                     else "UNSUPPORTED on %s" % _core.ARCH))
        add("signals trapped:")
        for s in signals.ALL:
            if s not in signals.TRAPPED:
                add("  %-8s not trapped (deselected: ffiguard.signals.select())" % s.name)
                continue
            now = _core.handlers()[int(s)]
            if now == _core.HANDLER:
                state = "ffiguard's handler is installed"
            elif now in (int(signal.SIG_DFL), int(signal.SIG_IGN)):
                state = ("NOT trapped now: %s was installed over ffiguard's handler "
                         "(ffiguard.signals.refresh() puts it back)"
                         % ("SIG_DFL" if now == int(signal.SIG_DFL) else "SIG_IGN"))
            else:
                state = ("another handler (at 0x%x) was installed after ffiguard's and is "
                         "first in line; ffiguard recovers guarded faults it passes on" % now)
            add("  %-8s %s" % (s.name, state))
        found = symbolize.available_backends()
        add("symbolizers:     (in order of preference; in use: %s)" % symbolize.backend())
        for name, where in found.items():
            if where is None:
                add("  %-16s not found%s" % (name, " (pip install 'ffiguard[symbols]')"
                                              if name == "pyelftools" else " on PATH"))
            else:
                add("  %-16s %s" % (name, where if name == "pyelftools" else _tool_version(where)))
        add("  %-16s always (dladdr, and ELF .symtab/.dynsym read by ffiguard)" % "fallback")
        kind, reason = ffiguard.shield.mechanism()
        add("shield:          %s" % reason)
        ok, why = ffiguard.shield.interpreter_availability()  # shield (issue 13)
        add("shield_interpreter: %s%s" % ("yes: " if ok else "no: ", why))
        add("on_fault default: %s" % ffiguard.get_default_policy())
        add("stats:           %s" % ffiguard.stats())
    return lines


def _doctor_run(args: argparse.Namespace) -> int:
    for line in doctor_lines():
        print(line)
    return 0


# ---- run, env ----------------------------------------------------------------------------
# `run` parses its own arguments (ffiguard.run.parse): everything after the script or
# `-m module` belongs to the program, which argparse cannot express. Its entry here is
# for the command list in --help; main() hands `run ...` over before argparse.


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER,
                        help="[options] script.py [args...] | [options] -m module [args...]")


def _run_run(args: argparse.Namespace) -> int:
    from ffiguard import run

    return run.main(args.argv)


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--signals", metavar="SPEC",
                        help="signals to trap (FFIGUARD_SIGNALS), e.g. SEGV,BUS")
    parser.add_argument("--on-fault", choices=("raise", "quarantine", "exit"),
                        help="default policy of every guarded library (FFIGUARD_ON_FAULT)")


def _env_run(args: argparse.Namespace) -> int:
    import shlex

    from ffiguard import run

    if args.signals is not None:
        from ffiguard import signals

        try:
            signals.parse(args.signals)
        except ValueError as e:
            sys.stderr.write("python -m ffiguard env: error: %s\n" % e)
            return 2
    env = run.environment(args.signals, args.on_fault)
    for name in ("FFIGUARD", "FFIGUARD_SIGNALS", "FFIGUARD_ON_FAULT", "PYTHONPATH"):
        if name in env:
            print("export %s=%s" % (name, shlex.quote(env[name])))
    return 0


COMMANDS = [
    ("demo", "run every kind of fault through a guarded call and show it caught",
     _demo_arguments, _demo_run),
    ("doctor", "print what this machine supports (for bug reports)",
     _doctor_arguments, _doctor_run),
    ("run", "run a program (script.py, -m module or -c code) with every foreign call guarded",
     _run_arguments, _run_run),
    ("env", "print the shell lines that make Python programs started later guard "
            "every foreign call (eval \"$(python -m ffiguard env)\")",
     _env_arguments, _env_run),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ffiguard",
        description="ffiguard: foreign calls that cannot crash Python.",
    )
    sub = p.add_subparsers(dest="command", metavar="command")
    for name, help_text, add_arguments, run in COMMANDS:
        cp = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(cp)
        cp.set_defaults(run=run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "run":  # see _run_arguments
        from ffiguard import run

        return run.main(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
