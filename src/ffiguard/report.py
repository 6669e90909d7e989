"""The full report of a ForeignFault, and the notes that put its native backtrace in the
traceback.

Everything here runs when a report or the notes are read, never on the fault path: the
exception holds the raw record (pcs, registers) and the call's arguments, and this module
turns them into text: the signal and code in words, the access, the registers, where the
fault address lies among the process's mappings (/proc/self/maps, read at report time),
the call with its arguments, the symbolized native backtrace (ffiguard.symbolize), and
whether the fault left the process in a suspect state (ffiguard.policy.classify).

Tracebacks: on Python 3.11+ the interpreter prints PEP 678 ``__notes__`` after the
exception line; ForeignFault.__notes__ is worked out on first read. Python 3.10 does not
print notes, so importing ffiguard there wraps sys.excepthook and threading.excepthook
(install_excepthook) to print the notes of every ForeignFault in the chain after the
usual traceback. traceback.print_exc() and logging do not go through those hooks: on
3.10 print e.report() or e.__notes__ yourself there.
"""
import os
import signal as _signal
import sys

__all__ = ["report", "notes", "describe_address", "read_maps", "install_excepthook"]

MAX_ARG_REPR = 80
NOTE_FRAMES = 16  # native frames in the traceback note; the report has them all


class _Style:
    def __init__(self, color):
        self.color = color

    def _wrap(self, code, text):
        return "\x1b[%sm%s\x1b[0m" % (code, text) if self.color else text

    def head(self, text):
        return self._wrap("1", text)

    def bad(self, text):
        return self._wrap("1;31", text)

    def warn(self, text):
        return self._wrap("33", text)

    def dim(self, text):
        return self._wrap("2", text)

    def good(self, text):
        return self._wrap("32", text)


# ---- memory map ------------------------------------------------------------------------------


def read_maps(path="/proc/self/maps"):
    """[(start, end, perms, offset, name)] of the process's mappings, now."""
    maps = []
    try:
        with open(path, errors="surrogateescape") as f:  # names as os.fsdecode gives them
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5:
                    continue
                lo, hi = parts[0].split("-")
                name = parts[5].strip() if len(parts) > 5 else ""
                maps.append((int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), name))
    except OSError:
        pass
    return maps


def _mmap_min_addr():
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            return int(f.read()) or 4096
    except (OSError, ValueError):
        return 65536


def _name(m):
    return m[4] or "anonymous mapping"


def _perms_words(perms):
    words = [w for flag, w in zip(perms[:3], ("read", "write", "execute")) if flag != "-"]
    return ", ".join(words) if words else "no access"


def describe_address(address, maps, sp=None, access=None):
    """Lines that place `address` among `maps` (see read_maps)."""
    if address is None:
        return ["no fault address (this signal does not carry one)"]
    lines = []
    inside = next((m for m in maps if m[0] <= address < m[1]), None)
    below = max((m for m in maps if m[1] <= address), key=lambda m: m[1], default=None)
    above = min((m for m in maps if m[0] > address), key=lambda m: m[0], default=None)
    if inside is not None:
        lo, hi, perms, _off, _n = inside
        text = "0x%x is inside %s (0x%x-0x%x, %s), at +0x%x" % (
            address, _name(inside), lo, hi, perms, address - lo)
        lines.append(text)
        if perms[:3] == "---":
            stackish = above is not None and above[0] == hi and "w" in above[2]
            lines.append("  a guard page (mapped with no access)%s" % (
                ": just below a writable mapping, as a thread's stack guard is -- the stack "
                "overflowed into it" if stackish else ""))
        elif access == "write" and "w" not in perms:
            lines.append("  the mapping allows %s only: writing it is not allowed" % _perms_words(perms))
        elif access == "execute" and "x" not in perms:
            lines.append("  the mapping is not executable: a jump or call to data")
        elif access == "read" and "r" not in perms:
            lines.append("  the mapping does not allow reading")
        return lines
    if address < _mmap_min_addr():
        lines.append("0x%x is in the NULL page region (below 0x%x, never mapped): a NULL pointer%s" % (
            address, _mmap_min_addr(), "" if address == 0 else " plus an offset of 0x%x" % address))
        return lines
    if address >= 1 << 47:
        lines.append("0x%x is beyond the user address space (non-canonical or kernel address): a wild pointer" % address)
        return lines
    lines.append("0x%x is not mapped" % address)
    if above is not None and above[4] == "[stack]" and above[0] - address <= 1 << 20:
        lines.append("  0x%x below the main thread's stack ([stack] starts at 0x%x): the stack "
                     "guard gap, beyond the stack -- a stack overflow" % (above[0] - address, above[0]))
    elif sp is not None and abs(address - sp) <= 1 << 16:
        lines.append("  0x%x from the stack pointer (sp=0x%x): beyond the stack -- a stack overflow"
                     % (abs(address - sp), sp))
    if below is not None:
        lines.append("  nearest below: %s (0x%x-0x%x, %s), ends 0x%x below" % (
            _name(below), below[0], below[1], below[2], address - below[1] + 1))
    if above is not None:
        lines.append("  nearest above: %s (0x%x-0x%x, %s), starts 0x%x above" % (
            _name(above), above[0], above[1], above[2], above[0] - address))
    return lines


# ---- the pieces ---------------------------------------------------------------------------


def _pointer_repr(value):
    """'c_void_p(0xdeadbee0)' for a ctypes pointer-like value (c_void_p, c_char_p,
    c_wchar_p, POINTER(T) instances: their address in hex; repr() gives it in decimal,
    or the Python object's address), else None."""
    import ctypes

    if isinstance(value, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p)):
        address = ctypes.cast(value, ctypes.c_void_p).value
    elif isinstance(value, ctypes._Pointer):
        address = ctypes.cast(value, ctypes.c_void_p).value
    else:
        return None
    return "%s(%s)" % (type(value).__name__, "NULL" if not address else "0x%x" % address)


def _short_repr(value):
    try:
        text = _pointer_repr(value) or repr(value)
    except Exception as e:  # a broken __repr__ must not break the report
        text = "<%s: repr failed: %s>" % (type(value).__name__, type(e).__name__)
    if len(text) > MAX_ARG_REPR:
        text = text[:MAX_ARG_REPR - 3] + "..."
    return text


def format_call(exc):
    """'name(arg, ..., key=value)' from the Python arguments given to the guarded call."""
    name = exc.function or "<unknown function>"
    call = exc._call
    if call is None:
        return name + "(...)"
    args, kwnames = call
    args = tuple(args or ())
    kwnames = tuple(kwnames or ())
    positional = args[:len(args) - len(kwnames)]
    parts = [_short_repr(a) for a in positional]
    parts += ["%s=%s" % (k, _short_repr(v)) for k, v in zip(kwnames, args[len(positional):])]
    return "%s(%s)" % (name, ", ".join(parts))


def _frames(exc):
    """Symbolized frames (cached on the exception)."""
    cached = exc._values.get("_symbolized")
    if cached is None:
        from . import faults, symbolize

        first = exc._raw[faults.REC_WHERE] if exc._raw is not None else False
        cached = exc._values["_symbolized"] = symbolize.symbolize(exc.frames or [], first=first)
    return cached


def suspect(exc):
    """(kind, symbol) from ffiguard.policy.classify for this fault (cached)."""
    cached = exc._values.get("_suspect")
    if cached is None:
        from . import policy

        cached = exc._values["_suspect"] = policy.classify(exc.frames or [])
    return cached


_SUSPECT_TEXT = {
    "heap corruption": "the C library's allocator detected heap corruption (in %s) and aborted: "
                       "the heap IS damaged. Anything that allocates may now misbehave or crash.",
    "allocator": "the fault happened inside the C library's allocator (%s): an allocator lock may "
                 "be held forever (the next malloc/free on any thread can deadlock) and the heap "
                 "may be half-updated.",
    "stdio": "the fault happened inside the C library's stdio (%s): that FILE's lock may be held "
             "forever (the next use of that stream can deadlock) and its buffer may be half-written.",
}


def suspect_text(exc):
    kind, symbol = suspect(exc)
    return _SUSPECT_TEXT[kind] % symbol if kind else None


def _backtrace_lines(frames, limit=None):
    if not frames:
        return ["  (no native frames recorded)"]
    width = len(str(len(frames) - 1))
    shown = frames if limit is None else frames[:limit]
    lines = ["  " + f.format(width).replace("\n", "\n  ") for f in shown]
    if len(shown) < len(frames):
        lines.append("  ... %d more frames: see e.report()" % (len(frames) - len(shown)))
    return lines


def _backend_label():
    from . import symbolize

    name = symbolize.backend()
    return "symbols from the ELF tables" + ("" if name == "none" else ", source lines from " + name)


def notes(exc):
    """The PEP 678 notes of a ForeignFault: the native backtrace (and suspect state)."""
    if exc._raw is None:
        return []
    try:
        frames = _frames(exc)
        lines = ["Native backtrace of %s, innermost first (%s):" % (format_call(exc), _backend_label())]
        lines += _backtrace_lines(frames, NOTE_FRAMES)
        if getattr(exc, "abort_message", None):
            lines.append("The C library's message before aborting: " + exc.abort_message)
        text = suspect_text(exc)
        if text:
            lines.append("Suspect state: " + text)
        lines.append("Full report: e.report()")
        return ["\n".join(lines)]
    except Exception as e:  # notes are read while a traceback prints: never fail there
        return ["Native backtrace unavailable (%s: %s); see e.frames" % (type(e).__name__, e)]


_SIGNAL_WORDS = {
    _signal.SIGSEGV: "segmentation fault: an invalid memory access",
    _signal.SIGBUS: "bus error: an access the memory behind the address cannot serve",
    _signal.SIGILL: "illegal instruction",
    _signal.SIGFPE: "arithmetic exception",
    _signal.SIGABRT: "abort: the code called abort() (also a failed assert() or a C library check)",
}


def report(exc, color=False):
    """The full report of a ForeignFault, as text."""
    from . import faults, policy

    st = _Style(color)
    out = []
    add = out.append
    name, meaning = faults.code_name(int(exc.signal), exc.code) if exc.signal is not None else ("?", "?")
    # a call stopped by Ctrl-C or its timeout (interrupt, issue 16) did not fault
    stopped = isinstance(exc, faults.ForeignTimeout) or getattr(
        sys.modules.get("ffiguard.interrupt"), "ForeignInterrupt", ()) is type(exc)
    add(st.bad("%s: %s" % (type(exc).__name__, exc)))
    add("")
    add(st.head("Stopped" if stopped else "Fault"))
    if exc.signal is not None:
        add("  signal:   %s (%d), %s" % (exc.signal.name, int(exc.signal), _SIGNAL_WORDS.get(exc.signal, "")))
        add("  code:     %s (%d): %s" % (name, exc.code, meaning))
    if exc.access:
        add("  access:   %s (as the CPU reported it)" % exc.access)
    elif exc.signal in (_signal.SIGSEGV, _signal.SIGBUS):
        add("  access:   not reported by the CPU")
    if exc.abort_message:
        add("  message:  %s   (what the C library wrote before aborting: glibc's __abort_msg)"
            % exc.abort_message.replace("\n", "\n            "))
    if exc.address is not None:
        add("  address:  0x%x" % exc.address)
    if exc.pc is not None:
        add("  pc:       0x%x" % exc.pc)
    if isinstance(exc, faults.ForeignStackOverflow):
        add("  verdict:  stack overflow: the foreign code ran out of stack")
    add("")
    add(st.head("Call"))
    add("  " + format_call(exc) + "   (the Python arguments, as passed to the guarded function)")
    frames = _frames(exc) if exc._raw is not None else None
    if frames:
        f0 = frames[0]
        add("  %s in: %s%s" % ("stopped" if stopped else "faulted", f0.where(),
                                " at " + f0.source() if f0.source() else ""))
        if f0.library:
            add("  library:    %s" % f0.library)
    mode = exc._on_fault
    add("  on_fault:   %s%s" % (mode, {
        "raise": " (the library can be called again)",
        "quarantine": " (the library is quarantined: further calls raise LibraryQuarantined "
                      "until ffiguard.release(lib))",
        "exit": " (the process ends now, status %d)" % policy.EXIT_STATUS,
    }.get(mode, "")))
    add("")
    add(st.head("Native backtrace") + " (innermost first; %s)" % (_backend_label() if frames is not None else "saved"))
    if frames is not None:
        out.extend(_backtrace_lines(frames))
    else:
        out.extend("  #%d 0x%x" % (i, pc) for i, pc in enumerate(exc.frames or []))
    add("")
    if stopped:
        add(st.head("Address"))
        add("  none: the call was stopped, it did not fault")
    else:
        add(st.head("Address") + " (/proc/self/maps read at report time, not at the fault: it may have changed since)")
        out.extend("  " + line for line in describe_address(exc.address, read_maps(), exc.sp, exc.access))
    regs = exc.registers or {}
    if regs:
        add("")
        add(st.head("Registers when stopped" if stopped else "Registers at the fault"))
        items = ["%-6s 0x%016x" % (k, v) for k, v in regs.items()]
        for i in range(0, len(items), 3):
            add("  " + "   ".join(items[i:i + 3]))
    add("")
    add(st.head("State"))
    text = suspect_text(exc) if exc._raw is not None else None
    if text:
        add("  " + st.warn("SUSPECT: " + text))
    else:
        add("  no frame in the C library's allocator or stdio.")
    add("  The foreign code was stopped mid-way: locks it held stay held and its data may be "
        "half-updated.\n  Save what matters; prefer restarting the process (or isolating the "
        "library) over carrying on.")
    text = "\n".join(out) + "\n"
    if not color and exc._raw is not None:
        exc._values["report"] = text
    return text


# ---- Python 3.10: print the notes of uncaught exceptions --------------------------------


def _fault_notes(exc, seen=None):
    from .faults import ForeignFault

    seen = set() if seen is None else seen
    found = []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ForeignFault):
            try:
                found.extend(exc.__notes__ or ())
            except Exception:
                pass
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return found


def install_excepthook():
    """On Python < 3.11, make uncaught ForeignFaults print their notes after the
    traceback (sys.excepthook and threading.excepthook); a no-op on 3.11+."""
    if sys.version_info >= (3, 11) or getattr(sys.excepthook, "__ffiguard__", False):
        return
    import threading

    previous = sys.excepthook

    def print_notes(exc):
        for note in _fault_notes(exc):
            try:
                sys.stderr.write(note + "\n")
            except Exception:
                pass

    def excepthook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        print_notes(exc)

    excepthook.__ffiguard__ = True
    sys.excepthook = excepthook

    previous_thread = threading.excepthook

    def thread_excepthook(args):
        previous_thread(args)
        print_notes(args.exc_value)

    thread_excepthook.__ffiguard__ = True
    threading.excepthook = thread_excepthook
