"""The exceptions a faulting foreign call raises, and the fault record -> exception step."""
import os
import signal as _signal

from . import _core

__all__ = [
    "ForeignFault", "SegmentationFault", "BusError", "IllegalInstruction", "ArithmeticFault",
    "ForeignAbort", "ForeignStackOverflow", "UnsupportedPlatform", "code_name", "describe_pc",
]

_STATE_WARNING = """

The process survived, but the foreign code was stopped in the middle of whatever it was
doing: it may hold a lock that is now never released, and its heap or other data may
be half-updated. Calls into the same library can deadlock or misbehave afterwards. Treat
the process as suspect: save what matters, and prefer restarting it (or isolating the
library) over carrying on for long."""


class ForeignFault(Exception):
    """A foreign (native) function faulted; ffiguard stopped it and raised this instead
    of letting the process die.

    Attributes: ``signal`` (signal.Signals), ``code`` (si_code), ``code_name`` (e.g.
    "SEGV_MAPERR"), ``address`` (the faulting address, None where the signal has none),
    ``access`` ("read", "write", "execute" or None when the CPU does not say), ``pc``,
    ``sp``, ``function`` (the guarded function called), ``library`` and ``symbol``
    (where ``pc`` is), ``frames`` (the native backtrace: return addresses, innermost
    first, ``frames[0] == pc``), ``registers`` (dict at the fault).
    """ + _STATE_WARNING

    signal_number = None

    def __init__(self, message="", **fields):
        super().__init__(message)
        self.signal = fields.get("signal")
        self.code = fields.get("code")
        self.code_name = fields.get("code_name")
        self.address = fields.get("address")
        self.access = fields.get("access")
        self.pc = fields.get("pc")
        self.sp = fields.get("sp")
        self.function = fields.get("function")
        self.library = fields.get("library")
        self.symbol = fields.get("symbol")
        self.frames = list(fields.get("frames") or [])
        self.registers = dict(fields.get("registers") or {})

    def __str__(self):
        return self.args[0] if self.args else ""


class SegmentationFault(ForeignFault):
    """SIGSEGV in a foreign call: an access to memory that is not mapped or not allowed."""
    signal_number = _signal.SIGSEGV


class ForeignStackOverflow(SegmentationFault):
    """SIGSEGV because the foreign code ran out of stack (e.g. unbounded recursion)."""


class BusError(ForeignFault):
    """SIGBUS in a foreign call: e.g. a read past the end of a memory-mapped file."""
    signal_number = _signal.SIGBUS


class IllegalInstruction(ForeignFault):
    """SIGILL in a foreign call: an invalid instruction (also __builtin_trap())."""
    signal_number = _signal.SIGILL


class ArithmeticFault(ForeignFault):
    """SIGFPE in a foreign call: e.g. an integer division by zero."""
    signal_number = _signal.SIGFPE


class ForeignAbort(ForeignFault):
    """SIGABRT in a foreign call: abort(), a failed assert(), or a C library that
    detected heap corruption (then the heap is certainly damaged)."""
    signal_number = _signal.SIGABRT


class UnsupportedPlatform(RuntimeError):
    """This machine's architecture or OS has no ffiguard guard (yet)."""


_CLASSES = {
    _signal.SIGSEGV: SegmentationFault,
    _signal.SIGBUS: BusError,
    _signal.SIGILL: IllegalInstruction,
    _signal.SIGFPE: ArithmeticFault,
    _signal.SIGABRT: ForeignAbort,
}

# si_code values (Linux, <asm-generic/siginfo.h>): name and what it means.
_GENERIC_CODES = {
    0: ("SI_USER", "sent by kill()"),
    0x80: ("SI_KERNEL", "sent by the kernel (e.g. a non-canonical address)"),
    -1: ("SI_QUEUE", "sent by sigqueue()"),
    -6: ("SI_TKILL", "sent by the thread itself: raise() or abort()"),
}
_CODES = {
    _signal.SIGSEGV: {
        1: ("SEGV_MAPERR", "address not mapped"),
        2: ("SEGV_ACCERR", "access not allowed by the page's protection"),
        3: ("SEGV_BNDERR", "failed address bound checks"),
        4: ("SEGV_PKUERR", "access not allowed by a protection key"),
        5: ("SEGV_ACCADI", "ADI not enabled for mapped object"),
        6: ("SEGV_ADIDERR", "disrupting MCD error"),
        7: ("SEGV_ADIPERR", "precise MCD exception"),
        8: ("SEGV_MTEAERR", "asynchronous memory tag check fault"),
        9: ("SEGV_MTESERR", "synchronous memory tag check fault"),
        10: ("SEGV_CPERR", "control protection fault"),
    },
    _signal.SIGBUS: {
        1: ("BUS_ADRALN", "misaligned access"),
        2: ("BUS_ADRERR", "no memory behind the address (e.g. past the end of a mapped file)"),
        3: ("BUS_OBJERR", "object-specific hardware error"),
        4: ("BUS_MCEERR_AR", "hardware memory error consumed"),
        5: ("BUS_MCEERR_AO", "hardware memory error detected"),
    },
    _signal.SIGILL: {
        1: ("ILL_ILLOPC", "illegal opcode"),
        2: ("ILL_ILLOPN", "illegal operand"),
        3: ("ILL_ILLADR", "illegal addressing mode"),
        4: ("ILL_ILLTRP", "illegal trap"),
        5: ("ILL_PRVOPC", "privileged opcode"),
        6: ("ILL_PRVREG", "privileged register"),
        7: ("ILL_COPROC", "coprocessor error"),
        8: ("ILL_BADSTK", "internal stack error"),
        9: ("ILL_BADIADDR", "unimplemented instruction address"),
    },
    _signal.SIGFPE: {
        1: ("FPE_INTDIV", "integer divide by zero"),
        2: ("FPE_INTOVF", "integer overflow"),
        3: ("FPE_FLTDIV", "floating-point divide by zero"),
        4: ("FPE_FLTOVF", "floating-point overflow"),
        5: ("FPE_FLTUND", "floating-point underflow"),
        6: ("FPE_FLTRES", "floating-point inexact result"),
        7: ("FPE_FLTINV", "invalid floating-point operation"),
        8: ("FPE_FLTSUB", "subscript out of range"),
        14: ("FPE_FLTUNK", "undiagnosed floating-point exception"),
        15: ("FPE_CONDTRAP", "trap on condition"),
    },
}

_ACCESS_VERBS = {"read": "reading", "write": "writing", "execute": "executing"}


def code_name(signum, code):
    """(name, meaning) of an si_code for a signal, e.g. ("SEGV_MAPERR", "address not mapped")."""
    found = _CODES.get(signum, {}).get(code) if code > 0 and code != 0x80 else None
    return found or _GENERIC_CODES.get(code, ("%d" % code, "unknown code"))


def describe_pc(pc):
    """(library path, symbol, text) for an address, from the dynamic symbol tables."""
    found = _core.dladdr(pc) if pc else None
    if not found:
        return None, None, "0x%x" % pc
    path, base, symbol, symbol_address = found
    where = "%s+0x%x" % (os.path.basename(path), pc - base)
    if symbol:
        return path, symbol, "%s (%s)" % (symbol, where)
    return path, None, "0x%x (%s)" % (pc, where)


def from_record(record, function):
    """Build the exception for a fault record made by the signal handler (_core)."""
    signum = _signal.Signals(record["signal"])
    cls = _CLASSES.get(signum, ForeignFault)
    if signum == _signal.SIGSEGV and record["stack_overflow"]:
        cls = ForeignStackOverflow
    name, meaning = code_name(signum, record["code"])
    library, symbol, where = describe_pc(record["pc"])
    address = record["address"]
    access = record["access"]

    parts = ["%s (%s: %s)" % (signum.name, name, meaning)]
    if cls is ForeignStackOverflow:
        parts.append("stack overflow at 0x%x" % address)
    elif address is not None and signum in (_signal.SIGSEGV, _signal.SIGBUS):
        parts.append("%s 0x%x" % (_ACCESS_VERBS.get(access, "at"), address))
    parts.append("in " + where if symbol else "at " + where)
    if function:
        parts.append("during call to %s" % function)
    return cls(
        " ".join(parts),
        signal=signum, code=record["code"], code_name=name, address=address, access=access,
        pc=record["pc"], sp=record["sp"], function=function, library=library, symbol=symbol,
        frames=record["frames"], registers=record["registers"],
    )


_core.set_fault_factory(from_record)
