"""What happens after a fault: the on_fault policy, and counting "suspect" faults.

on_fault, per library (ffiguard.CDLL(name, on_fault=...)) or global
(set_default_policy(), used by every library whose on_fault is None):

* "raise" (the default): raise the exception; the library can be called again.
* "quarantine": raise the exception, and mark the library quarantined: every further
  call into it raises LibraryQuarantined without calling, until ffiguard.release(lib).
* "exit": write the exception's full report to stderr and end the process at once with
  os._exit(EXIT_STATUS) (70, EX_SOFTWARE): no exception, no atexit handlers, no
  finalizers — nothing more runs in a process whose state is suspect.

A fault is *suspect* when a frame of its native backtrace is in the C library's
allocator (malloc, free, ...; a glibc heap-corruption abort is one of these) or in stdio
(FILE functions): a lock may be held forever and the heap may be damaged, for the whole
process, not just the faulting library. after_fault() only queues the raw pcs (the fault
path is measured); they are classified when stats() or a report asks.
"""
import os
import sys
import threading

from . import _core

__all__ = ["ON_FAULT", "EXIT_STATUS", "set_default_policy", "get_default_policy", "release",
           "suspect_count", "classify"]

ON_FAULT = ("raise", "quarantine", "exit")
EXIT_STATUS = 70  # EX_SOFTWARE (sysexits.h): internal software error

_default = "raise"
_pending = []  # raw frame bytes of faults not yet classified (list.append: atomic, no lock)
_PENDING_MAX = 256  # classified in a batch beyond this
_known = {}  # raw frame bytes -> suspect or not (a backtrace seen before)
_suspect = 0
_lock = threading.Lock()


def check_on_fault(on_fault):
    """on_fault itself if it is one of ON_FAULT; else a ValueError naming them."""
    if on_fault not in ON_FAULT:
        raise ValueError("on_fault must be one of %s, not %r" % (", ".join(ON_FAULT), on_fault))
    return on_fault


def set_default_policy(on_fault="raise"):
    """Set the global on_fault ("raise", "quarantine" or "exit"), used by every library
    whose own on_fault is None; returns the previous one."""
    global _default
    previous, _default = _default, check_on_fault(on_fault)
    return previous


def get_default_policy():
    """The global on_fault."""
    return _default


def _policy_of(lib):
    if isinstance(lib, _core.Policy):
        return lib
    policy = getattr(lib, "_ffiguard_policy", None)  # an ffiguard.CDLL
    if policy is None and isinstance(lib, _core.GuardedFunction):
        policy = lib.__policy__
    compiled = sys.modules.get("ffiguard.for_cffi_compiled")
    if policy is None and compiled is not None:  # a compiled cffi module guarded in place
        policy = compiled.policy_of(lib)
    if policy is None:
        raise TypeError("release() takes an ffiguard.CDLL, one of its functions or its policy, "
                        "or a compiled cffi module's lib guarded by install(), not %s"
                        % type(lib).__name__)
    return policy


def release(lib):
    """Lift a quarantine: calls into `lib` (an ffiguard.CDLL, one of its functions, or its
    policy) go through again. Returns True if it was quarantined."""
    policy = _policy_of(lib)
    was = policy.quarantined
    policy.quarantined = False
    return was


def is_quarantined(lib):
    return _policy_of(lib).quarantined


def mode_for(policy):
    """The on_fault that applies to a library's policy (or to a function guarded alone)."""
    mode = policy.on_fault if policy is not None else None
    return _default if mode is None else mode


def after_fault(exc, raw, policy):
    """Called by faults.from_record for every fault, with its raw backtrace bytes: queue
    them for the suspect count, then apply the policy. Cheap for "raise"."""
    _pending.append(raw)  # atomic on every build (free-threaded lists lock themselves)
    if len(_pending) > _PENDING_MAX:
        _classify_pending()
    mode = policy.on_fault if policy is not None else None
    if mode is None:
        mode = _default
    if mode == "raise":
        return exc
    exc._on_fault = mode
    if mode == "quarantine":
        if policy is not None:
            policy.quarantined = True
        return exc
    if mode == "exit":
        _exit_with_report(exc)
    return exc


def _exit_with_report(exc):
    try:
        text = exc.report()
    except BaseException as e:  # the report is best effort; exiting is not
        text = "%s: %s\n(the full report failed: %r)\n" % (type(exc).__name__, exc, e)
    text = text.rstrip("\n") + "\n\nffiguard: on_fault=\"exit\": ending the process with status %d.\n" % EXIT_STATUS
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BaseException:
        pass
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except BaseException:
        try:
            os.write(2, text.encode("utf-8", "replace"))
        except OSError:
            pass
    os._exit(EXIT_STATUS)


# ---- suspect state ------------------------------------------------------------------------

ALLOCATOR = frozenset("""
malloc free cfree calloc realloc reallocarray memalign posix_memalign aligned_alloc valloc
pvalloc malloc_trim malloc_usable_size malloc_stats malloc_info mallinfo mallinfo2 mallopt
libc_malloc libc_free libc_calloc libc_realloc libc_memalign libc_valloc libc_pvalloc
libc_mallopt libc_mallinfo malloc_consolidate malloc_printerr sysmalloc sysmalloc_mmap
munmap_chunk mremap_chunk unlink_chunk tcache_init tcache_thread_shutdown arena_get2
arena_get_retry malloc_check_init default_morecore libc_free_aligned
""".split())

STDIO = frozenset("""
fopen fopen64 fdopen freopen freopen64 fclose fcloseall fflush fputs fputc putc putchar
puts fputws fputwc putwc putwchar fgets fgetc getc getchar fgetws fgetwc getwc getwchar
ungetc ungetwc fread fwrite fprintf printf vfprintf vprintf fwprintf wprintf vfwprintf
vwprintf fscanf scanf vfscanf vscanf fwscanf wscanf vfwscanf vwscanf getline getdelim
setvbuf setbuf setbuffer setlinebuf fseek fseeko fseeko64 ftell ftello ftello64 rewind
fgetpos fsetpos fgetpos64 fsetpos64 feof ferror clearerr fileno flockfile funlockfile
ftrylockfile perror popen pclose open_memstream open_wmemstream fmemopen fopencookie
uflow overflow underflow woverflow wuflow wunderflow flushlbf fpurge fbufsize fpending
freading fwriting fsetlocking
""".split())

ABORT = frozenset(("abort", "libc_message", "malloc_printerr", "libc_fatal"))


# GCC's names for the parts it splits off a function (free.cold, _int_free.part.0,
# malloc_printerr.constprop.0, ...), as local symbols in a .symtab.
_PART_SUFFIXES = (".cold", ".part", ".isra", ".constprop", ".lto_priv")


def _base_name(name):
    n = name.lstrip("_")
    for suffix in _PART_SUFFIXES:
        cut = n.find(suffix)
        if cut > 0:
            n = n[:cut]
    for suffix in ("_chk", "_unlocked", "_internal"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
    if n.startswith("GI_"):
        n = n[3:].lstrip("_")
    return n


def classify_names(names):
    """(kind, symbol) for a backtrace's symbol names, innermost first: kind is
    "heap corruption", "allocator", "stdio" or None."""
    alloc = stdio = None
    aborted = False
    for name in names:
        if not name:
            continue
        # code outside every exported symbol: judged by the exported functions on either
        # side of it, i.e. by the object (malloc.o, a stdio file) it most likely lies in
        for n in (_base_name(x) for x in (_between_names(name) or (name,))):
            if n in ABORT:
                aborted = True
            if alloc is None and (n in ALLOCATOR or n.startswith("int_malloc") or n.startswith("int_free")
                                  or n.startswith("int_realloc") or n.startswith("int_memalign")):
                alloc = name
            if stdio is None and (n in STDIO or n.startswith("IO_")):
                stdio = name
    if alloc is not None:
        return ("heap corruption" if aborted else "allocator"), alloc
    if stdio is not None:
        return "stdio", stdio
    return None, None


def frame_names(pcs):
    """For each pc (pc - 1 for return addresses) the exported symbol containing it
    (dladdr); for a pc inside no exported symbol, the library's own ELF tables: its
    local symbol there when it has a .symtab (``free.cold``, ``_int_free``), else the
    code between two exported functions: ``"<libc.so.6+0x...> between A and B"``
    (``_between_names``), so that a split-off part of an allocator or stdio function
    (glibc 2.43's ``free(): invalid pointer`` comes from one, outside ``free``) is
    still recognised by the exported functions of the object it lies in."""
    names = []
    for i, pc in enumerate(pcs):
        at = pc - 1 if i else pc
        found = _core.dladdr(at) if pc > 1 else None
        name = found[2] if found else None
        if found and not name:
            name = _unexported_name(found[0], at - found[1], pc - found[1])
        names.append(name)
    return names


_BETWEEN = " between "


def _unexported_name(path, offset, shown):
    from . import symbolize

    lib = symbolize._library(path) if path else None  # cached per file; our own ELF reader
    if lib is None or not lib.elf.ok:
        return None
    vaddr = offset + lib.elf.load_vaddr
    if lib.symbols.has_symtab:
        hit = lib.symbols.function_at(vaddr)
        if hit is not None:
            return hit[0]
    before, after = lib.elf.neighbours(vaddr)
    if before is None and after is None:
        return None
    return "<%s+%#x>%s%s and %s" % (os.path.basename(path), shown, _BETWEEN, before, after)


def _between_names(name):
    """The two exported neighbours named by frame_names for unexported code, or ()."""
    head, sep, tail = name.partition(_BETWEEN)
    if not sep:
        return ()
    return tuple(n for n in tail.split(" and ", 1) if n != "None")


def classify(pcs):
    """(kind, symbol) for a native backtrace: see classify_names. Uses the exported
    symbols (dladdr) and, for code outside them, the library's own ELF symbol tables
    read by ffiguard (frame_names), never an external symbolizer: the count does not
    depend on which one is installed. Not every frame is in an exported symbol: glibc
    2.43's heap-corruption abort comes from code split off `free` (GCC's cold parts),
    and its backtrace never reaches `free` itself."""
    return classify_names(frame_names(pcs))


def _classify_pending():
    global _suspect
    import array

    with _lock:  # one classifier at a time; faults keep appending meanwhile
        batch = _pending[:]
        del _pending[:len(batch)]  # only what was copied: later appends are past it
        n = 0
        for raw in batch:
            bad = _known.get(raw)
            if bad is None:
                if len(_known) >= 4096:
                    _known.clear()
                bad = _known[raw] = classify(list(array.array("Q", raw)))[0] is not None
            n += bad
        _suspect += n


def suspect_count():
    """Faults so far whose backtrace was inside the C library's allocator or stdio."""
    _classify_pending()
    return _suspect
