"""Symbolizing native pcs: library+offset, symbol+offset, and file:line where there is DWARF.

Never used on the fault path: the signal handler records raw pcs only, and the exception
asks this module only when its report, its notes or its frames are read. Everything here
is cached per library file, keyed by (path, device, inode, mtime, size), so a library file
replaced on disk is read afresh, never answered from a stale cache.

Where each answer comes from, best first:

* library and offset: ``dladdr`` (always works while the library is loaded).
* symbol: the library's own ELF symbol tables, read here in pure Python: ``.symtab`` when
  the file (or its separate debug file, found by build-id or ``.gnu_debuglink`` under
  /usr/lib/debug) has one, else ``.dynsym``. A symbol is named only when the pc lies
  inside it (its size says so); otherwise the frame says ``<unknown>``, honestly, instead
  of the nearest exported name below, which is usually wrong for internal functions.
* demangled: C++ (Itanium ``_Z``) and Rust (legacy ``_ZN...17h<hash>E`` and v0 ``_R``)
  names are shown demangled (ffiguard.demangle); Frame.linkage_name keeps the symbol.
* file:line (and inlined calls): a DWARF backend chosen at run time, the first available
  of pyelftools (``pip install ffiguard[symbols]``), ``llvm-symbolizer``, ``addr2line``.
  The subprocess tools run once per library per report, on a batch of addresses, with a
  timeout. ``FFIGUARD_SYMBOLIZER`` forces one: ``pyelftools``, ``llvm-symbolizer``,
  ``addr2line`` or ``none`` (symbols only, no file:line).
"""
import bisect
import os
import shutil
import struct
import subprocess
import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from . import _core

__all__ = ["Frame", "symbolize", "symbol_at", "backend", "available_backends", "clear_cache"]

TOOL_TIMEOUT = 10.0  # seconds for one llvm-symbolizer/addr2line run
DEBUG_ROOT = "/usr/lib/debug"
_BACKEND_NAMES = ("pyelftools", "llvm-symbolizer", "addr2line")

calls = 0  # how many times symbolize() ran (the tests check the fault path never does)


class Frame(NamedTuple):
    """One native frame, symbolized."""

    index: int
    pc: int
    library: Optional[str]  # path of the shared object, None if not in one
    offset: Optional[int]  # pc - the object's load base
    symbol: Optional[str]  # containing symbol, None if unknown
    symbol_offset: Optional[int]
    file: Optional[str]  # source file (DWARF), None without debug info
    line: Optional[int]
    inlined: Tuple[Tuple[str, Optional[str], Optional[int]], ...] = ()  # (function, file, line), innermost first
    linkage_name: Optional[str] = None  # the mangled name, when `symbol` is its demangled form

    def where(self) -> str:
        """'symbol+0x12 (libfoo.so+0x1234)', '<unknown> (libfoo.so+0x1234)' or '0x...'."""
        if self.library is None:
            return "0x%x (not in any loaded library)" % self.pc
        lib = "%s+0x%x" % (os.path.basename(self.library) or self.library, self.offset)
        if self.symbol is None:
            return "<unknown> (%s)" % lib
        return "%s+0x%x (%s)" % (self.symbol, self.symbol_offset, lib)

    def source(self) -> Optional[str]:
        if self.file is None:
            return None
        return "%s:%d" % (self.file, self.line) if self.line else self.file

    def format(self, width: int = 2) -> str:
        text = "#%-*d 0x%012x %s" % (width, self.index, self.pc, self.where())
        src = self.source()
        if src:
            text += " at " + src
        if self.inlined:
            chain = " <- ".join("%s (%s:%s)" % (fn, os.path.basename(f or "?"), ln or "?")
                                for fn, f, ln in self.inlined)
            text += "\n%s inlined: %s" % (" " * (width + 16), chain)
        return text


# ---- ELF, in pure Python ---------------------------------------------------------------

_SHT_SYMTAB, _SHT_DYNSYM, _SHT_NOTE = 2, 11, 7
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_PT_LOAD = 1


class _Elf:
    """What symbolizing needs from an ELF64 little-endian file: functions with their
    sizes, the first PT_LOAD address, the build-id, the debuglink and whether it has
    DWARF line info. Anything unreadable leaves the fields empty."""

    def __init__(self, path: str):
        self.path = path
        self.ok = False
        self.load_vaddr = 0
        self.build_id: Optional[str] = None
        self.debuglink: Optional[str] = None
        self.has_symtab = False
        self.has_dwarf = False
        self._starts: List[int] = []
        self._syms: List[Tuple[int, int, str]] = []
        try:
            with open(path, "rb") as f:
                self._read(f)
            self.ok = True
        except (OSError, ValueError, struct.error, IndexError):
            pass

    def _read(self, f):
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            raise ValueError("not an ELF64 little-endian file")
        (phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
         shstrndx) = struct.unpack_from("<QQIHHHHHH", ident, 32)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        loads = []
        for i in range(phnum):
            p_type, _fl, _off, p_vaddr = struct.unpack_from("<IIQQ", ph, i * phentsize)
            if p_type == _PT_LOAD:
                loads.append(p_vaddr)
        self.load_vaddr = (min(loads) & ~0xFFF) if loads else 0
        f.seek(shoff)
        sh = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", sh, i * shentsize) for i in range(shnum)]

        def data(s):
            f.seek(s[4])
            return f.read(s[5])

        names = data(sections[shstrndx]) if shstrndx < len(sections) else b""

        def name_of(s):
            end = names.find(b"\0", s[0])
            return names[s[0]:end].decode("ascii", "replace")

        by_name = {name_of(s): s for s in sections}
        self.has_dwarf = ".debug_line" in by_name and by_name[".debug_line"][1] != 8  # not NOBITS
        note = by_name.get(".note.gnu.build-id")
        if note:
            raw = data(note)
            namesz, descsz, _type = struct.unpack_from("<III", raw, 0)
            start = 12 + ((namesz + 3) & ~3)
            self.build_id = raw[start:start + descsz].hex()
        link = by_name.get(".gnu_debuglink")
        if link:
            raw = data(link)
            self.debuglink = raw[:raw.index(b"\0")].decode("utf-8", "replace")
        table = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
        self.has_symtab = table is not None
        table = table or next((s for s in sections if s[1] == _SHT_DYNSYM), None)
        if table is None or table[1] == 8:
            return
        strtab = data(sections[table[6]])
        raw = data(table)
        best: Dict[int, Tuple[int, str]] = {}
        for off in range(0, len(raw) - 23, 24):
            st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", raw, off)
            if st_shndx == 0 or not st_value or (st_info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC):
                continue
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name:end].decode("utf-8", "replace")
            old = best.get(st_value)
            # Several names for one address (free, cfree, __libc_free): keep a public one.
            if old is None or (old[1].startswith("_") and not name.startswith("_")) or \
                    (old[1].startswith("_") == name.startswith("_") and len(name) < len(old[1])):
                best[st_value] = (st_size, name)
        self._syms = sorted((v, s, n) for v, (s, n) in best.items())
        self._starts = [v for v, _, _ in self._syms]

    def neighbours(self, vaddr: int) -> Tuple[Optional[str], Optional[str]]:
        """For a vaddr inside no function of the table: the functions just before and
        just after it (names, None at either end); (None, None) inside a function."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self._syms[i][0] + max(self._syms[i][1], 1):
            return None, None
        before = self._syms[i][2] if i >= 0 else None
        after = self._syms[i + 1][2] if i + 1 < len(self._syms) else None
        return before, after

    def function_at(self, vaddr: int) -> Optional[Tuple[str, int]]:
        """(name, offset) of the function containing vaddr, or None."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        start, size, name = self._syms[i]
        if vaddr < start + max(size, 1):
            return name, vaddr - start
        return None


def _debug_file(elf: _Elf) -> Optional[str]:
    """The separate debug file for elf (build-id, then debuglink), if installed."""
    if elf.build_id and len(elf.build_id) > 2:
        p = os.path.join(DEBUG_ROOT, ".build-id", elf.build_id[:2], elf.build_id[2:] + ".debug")
        if os.path.isfile(p):
            return p
    if elf.debuglink:
        d = os.path.dirname(os.path.realpath(elf.path))
        for p in (os.path.join(d, elf.debuglink), os.path.join(d, ".debug", elf.debuglink),
                  os.path.join(DEBUG_ROOT + d, elf.debuglink)):
            if os.path.isfile(p) and os.path.realpath(p) != os.path.realpath(elf.path):
                return p
    return None


# ---- DWARF backends: vaddrs -> {vaddr: ((function, file, line), ...) innermost first} ----

_Lines = Dict[int, Tuple[Tuple[Optional[str], Optional[str], Optional[int]], ...]]


def _pyelftools_lines(path: str, vaddrs: Sequence[int]) -> _Lines:
    from elftools.elf.elffile import ELFFile

    out: _Lines = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            return out
        dwarf = elf.get_dwarf_info()
        aranges = dwarf.get_aranges()
        cus = None
        for vaddr in vaddrs:
            cu = None
            if aranges is not None:
                off = aranges.cu_offset_at_addr(vaddr)
                cu = dwarf.get_CU_at(off) if off is not None else None
            candidates = [cu] if cu is not None else (cus if cus is not None else list(dwarf.iter_CUs()))
            if cu is None:
                cus = candidates
            for c in candidates:
                found = _line_in_cu(dwarf, c, vaddr)
                if found:
                    out[vaddr] = ((None,) + found,)
                    break
    return out


def _line_in_cu(dwarf, cu, vaddr):
    program = dwarf.line_program_for_CU(cu)
    if program is None:
        return None
    prev = None
    for entry in program.get_entries():
        state = entry.state
        if state is None:
            continue
        if prev is not None and prev.address <= vaddr < state.address and not prev.end_sequence:
            return _file_name(program, prev.file, cu), prev.line
        prev = None if state.end_sequence else state
    return None


def _file_name(program, index, cu):
    header = program.header
    entries = header["file_entry"]
    version = header["version"]
    i = index if version >= 5 else index - 1
    if not 0 <= i < len(entries):
        return None
    entry = entries[i]
    name = entry.name.decode("utf-8", "replace") if isinstance(entry.name, bytes) else str(entry.name)
    dirs = header["include_directory"]
    d = entry.dir_index if version >= 5 else entry.dir_index - 1
    if not os.path.isabs(name) and 0 <= d < len(dirs):
        dname = dirs[d]
        dname = dname.decode("utf-8", "replace") if isinstance(dname, bytes) else str(dname)
        name = os.path.join(dname, name)
    if not os.path.isabs(name):
        comp_dir = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
        if comp_dir is not None:
            value = comp_dir.value
            name = os.path.join(value.decode("utf-8", "replace") if isinstance(value, bytes) else value, name)
    return os.path.normpath(name)


def _tool_lines(tool: str, path: str, vaddrs: Sequence[int]) -> _Lines:
    """One llvm-symbolizer/addr2line run (GNU output style) for a batch of addresses."""
    argv = [tool]
    if os.path.basename(tool).startswith("llvm-symbolizer"):
        argv += ["--obj=" + path, "--output-style=GNU", "-f", "-C", "-i", "-a"]
    else:
        argv += ["-e", path, "-f", "-C", "-i", "-a"]
    argv += ["0x%x" % v for v in vaddrs]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return {}
    out: _Lines = {}
    current = None
    lines = proc.stdout.splitlines()
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith("0x") and " " not in text:
            current = int(text, 16)
            out[current] = ()
            i += 1
            continue
        if current is None or i + 1 >= len(lines):
            break
        function, location = text, lines[i + 1].strip()
        i += 2
        file, _, line = location.rpartition(":")
        if location.count(":") >= 2 and os.path.basename(tool).startswith("llvm-symbolizer"):
            file, _, line = file.rpartition(":")  # file:line:column
        if line.split(" ")[0].isdigit() and file and file != "??" and int(line.split(" ")[0]):
            entry = (None if function == "??" else function, os.path.normpath(file), int(line.split(" ")[0]))
            out[current] += (entry,)
    return {k: v for k, v in out.items() if v}


def available_backends() -> Dict[str, Optional[str]]:
    """{backend name: its version or path, or None if absent}, in order of preference."""
    found: Dict[str, Optional[str]] = {}
    try:
        import elftools

        found["pyelftools"] = "pyelftools " + getattr(elftools, "__version__", "?")
    except ImportError:
        found["pyelftools"] = None
    for tool in ("llvm-symbolizer", "addr2line"):
        found[tool] = shutil.which(tool)
    return found


def backend() -> str:
    """Name of the DWARF backend in use: one of pyelftools, llvm-symbolizer, addr2line,
    or "none" (symbols only). FFIGUARD_SYMBOLIZER forces a choice."""
    forced = os.environ.get("FFIGUARD_SYMBOLIZER")
    if forced:
        return forced
    found = available_backends()
    return next((name for name in _BACKEND_NAMES if found[name]), "none")


def _lines(name: str, path: str, vaddrs: Sequence[int]) -> _Lines:
    if not vaddrs or name == "none":
        return {}
    if name == "pyelftools":
        try:
            return _pyelftools_lines(path, vaddrs)
        except ImportError:
            return {}
        except Exception:  # a malformed or unsupported DWARF: no lines, not a crash
            return {}
    tool = shutil.which(name)
    return _tool_lines(tool, path, vaddrs) if tool else {}


# ---- per-library cache --------------------------------------------------------------------

class _Library:
    def __init__(self, path: str):
        self.path = path
        self.elf = _Elf(path)
        debug = _debug_file(self.elf) if self.elf.ok else None
        self.debug_elf = _Elf(debug) if debug else None
        self.symbols = self.elf
        if self.debug_elf and self.debug_elf.ok and self.debug_elf.has_symtab and not self.elf.has_symtab:
            self.symbols = self.debug_elf
        self.dwarf_path = None
        if self.elf.has_dwarf:
            self.dwarf_path = path
        elif self.debug_elf and self.debug_elf.has_dwarf:
            self.dwarf_path = self.debug_elf.path
        self.lines: Dict[Tuple[str, int], tuple] = {}


_cache: Dict[tuple, _Library] = {}
_lock = threading.Lock()


def _key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _library(path: str) -> Optional[_Library]:
    key = _key(path)
    if key is None:
        return None
    with _lock:
        lib = _cache.get(key)
        if lib is None:
            lib = _cache[key] = _Library(path)
        return lib


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _main_program() -> str:
    try:
        return os.readlink("/proc/self/exe")
    except OSError:
        return ""


def symbolize(pcs: Sequence[int], first: object = False, use_backend: Optional[str] = None) -> List[Frame]:
    """Frames for a native backtrace (innermost first). pcs[0] is the faulting
    instruction; the others are return addresses, looked up at pc - 1 (the call).
    `first` is a _core.dladdr() answer for pcs[0] already looked up, if any."""
    global calls
    with _lock:  # a read-modify-write: not atomic without the GIL
        calls += 1
    name = use_backend or backend()
    looked = []  # (index, pc, lookup address, dladdr answer)
    for i, pc in enumerate(pcs):
        at = pc if i == 0 else pc - 1
        found = first if (i == 0 and first is not False) else (_core.dladdr(at) if at > 0 else None)
        looked.append((i, pc, at, found))
    # Batch the DWARF lookups per library.
    wanted: Dict[str, List[int]] = {}
    libs: Dict[str, Optional[_Library]] = {}
    for i, pc, at, found in looked:
        if not found:
            continue
        path = found[0] or _main_program()
        if path not in libs:
            libs[path] = _library(path)
        lib = libs[path]
        if lib is not None and lib.dwarf_path:
            vaddr = at - found[1] + lib.elf.load_vaddr
            if (name, vaddr) not in lib.lines:
                wanted.setdefault(path, []).append(vaddr)
    for path, vaddrs in wanted.items():
        lib = libs[path]
        answers = _lines(name, lib.dwarf_path, sorted(set(vaddrs)))
        with _lock:
            for v in vaddrs:
                lib.lines[(name, v)] = answers.get(v, ())
    frames = []
    for i, pc, at, found in looked:
        if not found:
            frames.append(Frame(i, pc, None, None, None, None, None, None))
            continue
        path, base = found[0] or _main_program(), found[1]
        lib = libs.get(path)
        symbol, symbol_offset, linkage = _symbol(lib, pc, at, found)
        file = line = None
        inlined = ()
        if lib is not None and lib.elf.ok:
            entries = lib.lines.get((name, at - base + lib.elf.load_vaddr), ())
            if entries:
                _fn, file, line = entries[0]
                if len(entries) > 1:  # inlined calls: innermost first, each inlined into the next
                    inlined = tuple((fn or "?", f, ln) for fn, f, ln in entries)
        frames.append(Frame(i, pc, path, pc - base, symbol, symbol_offset, file, line, inlined,
                            linkage))
    return frames


def _symbol(lib, pc, at, found):
    """(demangled symbol, offset of pc in it, linkage name if it differs) for the
    function containing `at` (pc, or pc - 1 for a return address): the library's ELF
    tables (.symtab, else .dynsym), else dladdr's answer; (None, None, None) if none."""
    _path, base, dsym, dsym_addr = found
    symbol = symbol_offset = None
    if lib is not None and lib.elf.ok:
        hit = lib.symbols.function_at(at - base + lib.elf.load_vaddr)
        if hit is not None:
            symbol, symbol_offset = hit[0], hit[1] + (pc - at)
    if symbol is None and dsym:
        symbol, symbol_offset = dsym, pc - dsym_addr
    if symbol is None:
        return None, None, None
    from . import demangle

    readable = demangle.demangle(symbol)
    return readable, symbol_offset, (symbol if readable != symbol else None)


def symbol_at(pc: int, found: object = False) -> Tuple[Optional[str], Optional[int], Optional[str], Optional[int]]:
    """(library path, pc's offset in it, symbol, pc's offset in the symbol) for the
    faulting pc, named exactly as symbolize() names frame 0 (but without DWARF and
    without counting as a symbolize() call). `found` is a _core.dladdr() answer already
    looked up for pc."""
    if found is False:
        found = _core.dladdr(pc) if pc > 0 else None
    if not found:
        return None, None, None, None
    path = found[0] or _main_program()
    symbol, symbol_offset, _linkage = _symbol(_library(path), pc, pc, found)
    return path, pc - found[1], symbol, symbol_offset
