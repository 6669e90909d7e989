"""The exceptions a faulting foreign call raises, and the fault record -> exception step."""
import array
import os
import signal as _signal

from . import _core

__all__ = [
    "ForeignFault", "SegmentationFault", "BusError", "IllegalInstruction", "ArithmeticFault",
    "ForeignAbort", "ForeignStackOverflow", "LibraryQuarantined", "UnsupportedPlatform",
    "ProtectionKeyViolation", "ForeignTimeout", "code_name", "describe_pc",
]

_STATE_WARNING = """

The process survived, but the foreign code was stopped in the middle of whatever it was
doing: it may hold a lock that is now never released, and its heap or other data may
be half-updated. Calls into the same library can deadlock or misbehave afterwards. Treat
the process as suspect: save what matters, and prefer restarting it (or isolating the
library) over carrying on for long."""


# Positions in the raw fault record made by _core (fault_as_tuple in _core/guarded.c,
# which knows REC_FRAMES and the count too).
REC_SIGNAL, REC_CODE, REC_ADDRESS, REC_PC, REC_SP, REC_ACCESS, REC_STACK_OVERFLOW, \
    REC_FRAMES, REC_REGISTERS, REC_WHERE = range(10)


def _field(name, compute):
    """A ForeignFault attribute: set explicitly, or derived from the raw fault record on
    first access (the fault path stays cheap when nobody reads it)."""
    def get(self):
        values = self._values
        if name not in values:
            values[name] = compute(self) if self._raw is not None else None
        return values[name]

    def set(self, value):
        self._values[name] = value

    return property(get, set, doc=name)


def _rebuild(cls, values):
    exc = BaseException.__new__(cls)  # not ForeignAbort.__new__: no fault happened here
    exc._raw = None
    exc._values = dict(values)
    return exc


_NO_NOTES = object()  # __notes__ was deleted


def _init_fields(exc, message, fields):
    """The state a ForeignFault (or interrupt's ForeignInterrupt, a KeyboardInterrupt
    with its attributes) is made with: no raw record, the given fields."""
    exc._raw = None
    exc._values = dict(fields)
    if message is not None:
        exc._values["message"] = message


class ForeignFault(Exception):
    """A foreign (native) function faulted; ffiguard stopped it and raised this instead
    of letting the process die.

    Attributes: ``signal`` (signal.Signals), ``code`` (si_code), ``code_name`` (e.g.
    "SEGV_MAPERR"), ``address`` (the faulting address, None where the signal has none),
    ``access`` ("read", "write", "execute" or None when the CPU does not say), ``pc``,
    ``sp``, ``function`` (the guarded function called), ``library`` and ``symbol``
    (where ``pc`` is: the symbol the report's first frame names, demangled),
    ``abort_message`` (for a SIGABRT: the message glibc wrote before aborting, e.g.
    "free(): invalid pointer", or None), ``frames`` (the native backtrace: return addresses, innermost
    first, ``frames[0] == pc``), ``registers`` (dict at the fault).

    ``report()`` returns the full report (signal and code in words, registers, the fault
    address among the process's mappings, the call's arguments, the symbolized native
    backtrace, suspect state). ``__notes__`` (PEP 678) holds the symbolized native
    backtrace, worked out when first read, so tracebacks show it.
    """ + _STATE_WARNING

    signal_number = None
    _raw = None  # the tuple made by _core, or None
    _call = None  # (args, kwnames) of the guarded call, for the report
    _on_fault = "raise"  # the policy applied
    _notes = None  # __notes__ once worked out (a list), or _NO_NOTES

    def __init__(self, message=None, **fields):
        super().__init__()
        _init_fields(self, message, fields)

    @classmethod
    def _from_record(cls, record, function, call=None):
        exc = cls.__new__(cls)
        exc._raw = record
        exc._values = {"function": function}
        exc._call = call
        return exc

    signal = _field("signal", lambda self: _signal.Signals(self._raw[REC_SIGNAL]))
    code = _field("code", lambda self: self._raw[REC_CODE])
    code_name = _field("code_name", lambda self: code_name(self._raw[REC_SIGNAL],
                                                           self._raw[REC_CODE])[0])
    address = _field("address", lambda self: self._raw[REC_ADDRESS])
    pc = _field("pc", lambda self: self._raw[REC_PC])
    sp = _field("sp", lambda self: self._raw[REC_SP])
    access = _field("access", lambda self: self._raw[REC_ACCESS])
    function = _field("function", lambda self: None)
    library = _field("library", lambda self: self._where()[0])
    symbol = _field("symbol", lambda self: self._where()[1])
    frames = _field("frames", lambda self: list(array.array("Q", self._raw[REC_FRAMES])))
    registers = _field("registers", lambda self: _registers(self._raw))
    # read when the exception is made (ForeignAbort.__new__), for a SIGABRT only
    abort_message = _field("abort_message", lambda self: self.__dict__.get("_abort_message"))
    message = _field("message", lambda self: _message(self))

    def _where(self):
        """(library, symbol, text) for pc: from the record (its library looked up at the
        fault, while the library was surely loaded; the symbol from the library's ELF
        tables, as the report's first frame) or, for an exception made by hand, now."""
        found = self._values.get("_where")
        if found is None:
            if self._raw is not None:
                found = describe_pc(self._raw[REC_PC], self._raw[REC_WHERE])
            elif self.pc is not None:
                found = describe_pc(self.pc)
            else:
                found = (None, None, "an unknown address")
            self._values["_where"] = found
        return found

    def report(self, color=False):
        """The full text report of this fault (see ffiguard.report); worked out now,
        then cached. `color` adds ANSI colours for a terminal."""
        saved = self._values.get("report")
        if saved is not None and not color:
            return saved
        from . import report
        return report.report(self, color=color)

    @property
    def __notes__(self):
        """PEP 678 notes: the symbolized native backtrace first (worked out on first
        read), then any added with add_note()."""
        notes = self._notes
        if notes is None:
            from . import report
            notes = self._notes = report.notes(self)
        elif notes is _NO_NOTES:
            raise AttributeError("__notes__")
        return notes

    @__notes__.setter
    def __notes__(self, value):
        self._notes = value

    @__notes__.deleter
    def __notes__(self):
        if self._notes is _NO_NOTES:
            raise AttributeError("__notes__")
        self._notes = _NO_NOTES

    @property
    def args(self):
        return (self.message,) if self.message is not None else ()

    @args.setter
    def args(self, value):
        self._values["message"] = value[0] if value else None

    def __str__(self):
        return self.message or ""

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.message)

    def __reduce__(self):
        names = ("message", "signal", "code", "code_name", "address", "access", "pc", "sp",
                 "function", "library", "symbol", "frames", "registers", "abort_message")
        values = {n: getattr(self, n) for n in names}
        if self._raw is not None:  # the addresses mean nothing elsewhere: send the texts
            values["report"] = self.report()
        notes = getattr(self, "__notes__", None)  # PEP 678 notes travel too
        return _rebuild, (type(self), values), {"_notes": list(notes)} if notes else None


class SegmentationFault(ForeignFault):
    """SIGSEGV in a foreign call: an access to memory that is not mapped or not allowed."""
    signal_number = _signal.SIGSEGV


class ForeignStackOverflow(SegmentationFault):
    """SIGSEGV because the foreign code ran out of stack (e.g. unbounded recursion)."""


class ProtectionKeyViolation(SegmentationFault):
    """SIGSEGV because a guarded foreign call touched memory shielded with
    ffiguard.shield() (or ffiguard.protected_buffer()): a write to a "read-only" region,
    any access to a "none" region. The access did not happen: the bytes are unchanged.

    ``address`` is the exact byte accessed. With protection keys ``code_name`` is
    "SEGV_PKUERR" and ``pkey`` is the key; under the mprotect fallback (no protection
    keys) ``code_name`` is "SEGV_ACCERR" and ``pkey`` is None."""

    pkey = _field("pkey", lambda self: None)


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
    detected heap corruption (then the heap is certainly damaged). ``abort_message``:
    what glibc wrote before aborting ("free(): invalid pointer", a failed assert's
    text), or None."""
    signal_number = _signal.SIGABRT

    def __new__(cls, *args, **kwargs):
        # Made by the fault path (_core, or from_record) with no arguments, right after
        # the recovery: glibc's message must be read now, before another abort replaces
        # it (ffiguard.abortmsg). An exception made by hand has its message argument.
        exc = super().__new__(cls, *args, **kwargs)
        if not args and not kwargs:
            from . import abortmsg
            exc._abort_message = abortmsg.take()
        return exc


def _stop_message(exc, how):
    """The message of a stopped call (interrupt, issue 16): how, where, which call."""
    parts = [how]
    if exc._raw is not None and not exc._raw[REC_PC]:
        parts.append("(its return, while Python code ran: it was never in foreign code when tried)")
    else:
        library, symbol, where = exc._where()
        parts.append("in " + where if symbol else "at " + where)
    if exc.function:
        parts.append("during call to %s" % exc.function)
    return " ".join(parts)


class ForeignTimeout(ForeignFault):
    """A foreign call ran longer than its timeout and was stopped.

    Trap mode (``timeout=`` on ffiguard.CDLL or guard(), ``lib.f.timeout``): the call
    was stopped where it was, as a fault is recovered, and ``pc``, ``frames`` and
    ``report()`` say where it hung (``signal`` is None: no fault). Isolate mode: the
    helper was killed (and is restarted for the next call under restart="always"); ``pid``
    is the helper's. ``timeout`` (seconds), ``function``. Defined here (isolate mode
    raises the same class) so that importing it does not load isolate mode."""

    timeout = _field("timeout", lambda self: None)
    pid = _field("pid", lambda self: None)
    signal = _field("signal", lambda self: None)
    code_name = _field("code_name", lambda self: None)
    message = _field("message", lambda self: _stop_message(
        self, "stopped after its timeout of %g s" % self.timeout if self.timeout else "stopped (timeout)"))

    def __reduce__(self):
        rebuild, (cls, values), *rest = ForeignFault.__reduce__(self)
        values = dict(values, timeout=self.timeout, pid=self.pid)
        return (rebuild, (cls, values), *rest)


class LibraryQuarantined(RuntimeError):
    """A call into a library that faulted earlier under on_fault="quarantine"; nothing
    was called. Release the library (ffiguard.release(lib)) to call it again."""


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


def describe_pc(pc, found=False):
    """(library path, symbol, text) for an address: the symbol as the report's first
    frame names it (ELF .symtab, else .dynsym, else dladdr; demangled: see
    ffiguard.symbolize.symbol_at); `found` is a _core.dladdr() answer already looked up
    for it."""
    if found is False:
        found = _core.dladdr(pc) if pc else None
    if not found:
        return None, None, "0x%x" % pc
    from . import symbolize  # reads symbol tables: only when a message or symbol is read

    path, offset, symbol, _symbol_offset = symbolize.symbol_at(pc, found)
    where = "%s+0x%x" % (os.path.basename(path), offset)
    if symbol:
        return path, symbol, "%s (%s)" % (symbol, where)
    return path, None, "0x%x (%s)" % (pc, where)


# Registers the kernel fills from the thread's last CPU exception (see the arch header):
# left out when this signal did not come from one.
_TRAP_REGISTERS = frozenset(getattr(_core, "TRAP_REGISTERS", ()))
_PAGE_FAULT_REGISTERS = frozenset(getattr(_core, "PAGE_FAULT_REGISTERS", ()))


def _registers(raw):
    """The saved registers, without those this signal did not set: err/trapno/cr2 of an
    earlier fault when the signal was sent (si_code <= 0: abort(), kill), cr2 when the
    exception was not a page fault."""
    regs = dict(zip(_core.REGISTER_NAMES, array.array("Q", raw[REC_REGISTERS])))
    if raw[REC_CODE] <= 0:  # sent, not caused by an instruction (SI_USER, SI_TKILL, ...)
        for name in _TRAP_REGISTERS:
            regs.pop(name, None)
    elif _PAGE_FAULT_REGISTERS and regs.get(_core.TRAPNO_REGISTER) != _core.TRAP_PAGE_FAULT:
        for name in _PAGE_FAULT_REGISTERS:
            regs.pop(name, None)
    return regs


def _message(exc):
    signum, code, address, access = exc.signal, exc.code, exc.address, exc.access
    name, meaning = code_name(signum, code)
    parts = ["%s (%s: %s)" % (signum.name, name, meaning)]
    if isinstance(exc, ForeignStackOverflow):
        parts.append("stack overflow at 0x%x" % address)
    elif address is not None and signum in (_signal.SIGSEGV, _signal.SIGBUS):
        parts.append("%s 0x%x" % (_ACCESS_VERBS.get(access, "at"), address))
    library, symbol, where = exc._where()
    parts.append("in " + where if symbol else "at " + where)
    if exc.function:
        parts.append("during call to %s" % exc.function)
    return " ".join(parts)


_CLASS_OF = {int(signum): cls for signum, cls in _CLASSES.items()}  # by plain int: no enum hashing
_SIGSEGV = int(_signal.SIGSEGV)


def from_record(record, function, args=(), kwnames=None, policy=None):
    """The exception for a fault record made by the signal handler (_core); called by
    _core on the fault path, so everything but the class is worked out lazily. `args`
    are the Python arguments of the call (keyword values last, named by `kwnames`);
    `policy` is the library's _core.Policy or None. What ForeignFault._from_record
    does, inline: this is the one Python frame of the fault path besides the policy's."""
    signum = record[REC_SIGNAL]
    if signum == _SIGSEGV and record[REC_STACK_OVERFLOW]:
        cls = ForeignStackOverflow
    else:
        cls = _CLASS_OF.get(signum, ForeignFault)
    pkey = False
    if signum == _SIGSEGV and shield_classify is not None:  # shield (issue 13)
        pkey = shield_classify(record)
        if pkey is not False:
            cls = ProtectionKeyViolation
    exc = cls.__new__(cls)  # BaseException's, but ForeignAbort's own for a SIGABRT
    exc._raw = record
    exc._values = {"function": function}
    exc._call = (args, kwnames)
    if pkey is not False:
        exc._values["pkey"] = pkey
    return _after_fault(exc, record[REC_FRAMES], policy)


# shield (issue 13): set by ffiguard.shield when first imported: record -> the pkey
# (None under the mprotect fallback) when the fault is a shield violation, else False.
# While it is set, _core hands every SIGSEGV to from_record (it looks it up here).
shield_classify = None


from .policy import after_fault as _after_fault  # noqa: E402  (policy imports nothing of ours but _core)

_core.set_fault_factory(from_record)
_core.set_fault_types(_CLASS_OF, ForeignStackOverflow, ForeignFault, _after_fault,  # from_record, in C
                      globals())  # ... but from_record itself for SIGSEGV while shield_classify is set
_core.set_quarantine_error(LibraryQuarantined)
