"""Demangling symbol names for reports: C++ (Itanium ``_Z...``), Rust legacy
(``_ZN...17h<hash>E``) and Rust v0 (``_R...``).

Used when a report, a message or ``e.symbol`` is read, never on the fault path. All in
process, so that reading ``str(e)`` never starts a program:

* Rust v0 (``_R``): our own demangler of the v0 grammar (RFC 2603, "Rust Symbol
  Name Mangling v0"), printed as rustc-demangle's alternate form (no crate hashes):
  ``mycrate::module::<mycrate::Type as core::fmt::Display>::fmt``.
* Rust legacy (``_ZN...17h<16 hex digits>E``): our own: the path's identifiers, their
  ``$LT$``-style escapes undone, the hash left out.
* C++ (other ``_Z``): ``__cxa_demangle`` from libstdc++ (through ctypes, not guarded:
  it is made for untrusted input); where libstdc++ cannot be loaded, ``c++filt`` or
  ``llvm-cxxfilt`` if installed; else the name stays mangled.

``FFIGUARD_DEMANGLE=0`` (or ``none``) turns demangling off. A name that does not parse is
returned unchanged: demangling is a convenience, never a reason for a report to fail.
"""
import ctypes
import functools
import os
import re
import shutil
import subprocess
import threading

__all__ = ["demangle", "rust_v0", "rust_legacy", "cxx"]

MAX_DEPTH = 200  # nesting of a v0 name we follow before giving up (a malformed name)
MAX_NAME = 4096  # longer names are left alone
TOOL_TIMEOUT = 5.0
_OFF = ("0", "no", "false", "off", "none")


def demangle(name):
    """The demangled form of a symbol name, or the name itself."""
    if not name or len(name) > MAX_NAME or \
            os.environ.get("FFIGUARD_DEMANGLE", "").strip().lower() in _OFF:
        return name
    return _cached(name)


@functools.lru_cache(maxsize=4096)
def _cached(name):
    try:
        if name.startswith("_R"):
            return rust_v0(name) or name
        if name.startswith("_ZN") and _LEGACY_HASH.search(name):
            return rust_legacy(name) or name
        if name.startswith("_Z"):
            return cxx(name) or name
    except (ValueError, IndexError, KeyError, RecursionError, UnicodeError):
        pass
    return name


# ---- C++: __cxa_demangle ---------------------------------------------------------------

_lock = threading.Lock()
_cxa = None  # (demangle, free) or False once known to be unavailable


def _cxa_functions():
    global _cxa
    with _lock:
        if _cxa is None:
            try:
                from .everything import _ORIGINAL_CDLL  # not guarded: see the module doc

                stdcxx = _ORIGINAL_CDLL("libstdc++.so.6")
                libc = _ORIGINAL_CDLL(None)
                fn = getattr(stdcxx, "__cxa_demangle")
                fn.restype = ctypes.c_void_p
                fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_int)]
                free = libc.free
                free.argtypes = [ctypes.c_void_p]
                free.restype = None
                _cxa = (fn, free)
            except (OSError, AttributeError):
                _cxa = False
        return _cxa


def cxx(name):
    """A C++ (Itanium ABI) name demangled, or None."""
    found = _cxa_functions()
    if found:
        fn, free = found
        status = ctypes.c_int(-1)
        out = fn(name.encode("ascii"), None, None, ctypes.byref(status))
        if not out:
            return None
        try:
            return ctypes.string_at(out).decode("utf-8", "replace") if status.value == 0 else None
        finally:
            free(out)
    return _tool(name)


def _tool(name):
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, name], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    text = proc.stdout.strip()
    return text if proc.returncode == 0 and text and text != name else None


# ---- Rust legacy -------------------------------------------------------------------------

_LEGACY_HASH = re.compile(r"17h[0-9a-f]{16}E")
_LEGACY_ESCAPES = {"SP": "@", "BP": "*", "RF": "&", "LT": "<", "GT": ">", "LP": "(",
                   "RP": ")", "C": ","}


def rust_legacy(name):
    """A Rust legacy-mangled name (``_ZN<len><ident>...17h<hash>E``) demangled without
    its hash, or None if it is not one."""
    i, parts = 3, []
    while i < len(name) and name[i] != "E":
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        if j == i:
            return None
        n = int(name[i:j])
        ident, i = name[j:j + n], j + n
        if len(ident) != n:
            return None
        parts.append(ident)
    if i >= len(name) or not parts:
        return None
    if re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
        parts.pop()
    return "::".join(_legacy_ident(p) for p in parts)


def _legacy_ident(ident):
    if ident.startswith("_$"):
        ident = ident[1:]
    out, i = [], 0
    while i < len(ident):
        c = ident[i]
        if c == "$":
            end = ident.find("$", i + 1)
            if end < 0:
                raise ValueError("unterminated escape")
            code = ident[i + 1:end]
            if code in _LEGACY_ESCAPES:
                out.append(_LEGACY_ESCAPES[code])
            elif code.startswith("u"):
                out.append(chr(int(code[1:], 16)))
            else:
                raise ValueError("unknown escape $%s$" % code)
            i = end + 1
        elif ident.startswith("..", i):
            out.append("::")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# ---- Rust v0 -------------------------------------------------------------------------------

_BASIC_TYPES = {
    "a": "i8", "b": "bool", "c": "char", "d": "f64", "e": "str", "f": "f32", "h": "u8",
    "i": "isize", "j": "usize", "l": "i32", "m": "u32", "n": "i128", "o": "u128",
    "s": "i16", "t": "u16", "u": "()", "v": "...", "x": "i64", "y": "u64", "z": "!",
    "p": "_",
}
_SIGNED = {"a", "s", "l", "x", "n", "i"}
_UNSIGNED = {"h", "t", "m", "y", "o", "j"}
_B62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _V0:
    """A recursive-descent reader of one v0 symbol (the part after "_R"), printing as it
    goes. Backreferences re-read the name at an earlier position."""

    def __init__(self, text):
        self.s = text
        self.i = 0
        self.depth = 0
        self.bound_lifetimes = 0  # lifetimes bound by enclosing binders (for 'a, 'b, ...)

    # -- lexing
    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def eat(self, c):
        if self.peek() == c:
            self.i += 1
            return True
        return False

    def next(self):
        if self.i >= len(self.s):
            raise ValueError("unexpected end")
        c = self.s[self.i]
        self.i += 1
        return c

    def base62(self):
        """<base-62-number>: "_" is 0, digits then "_" are the value + 1."""
        if self.eat("_"):
            return 0
        value = 0
        while True:
            c = self.next()
            if c == "_":
                return value + 1
            d = _B62.find(c)
            if d < 0:
                raise ValueError("bad base-62 digit")
            value = value * 62 + d

    def opt_base62(self, tag):
        return self.base62() + 1 if self.eat(tag) else 0

    def decimal(self):
        start = self.i
        if self.eat("0"):  # "0" alone: a following digit starts the next token
            return 0
        while self.peek().isdigit():
            self.i += 1
        if start == self.i:
            raise ValueError("number expected")
        return int(self.s[start:self.i])

    def ident(self):
        """<undisambiguated-identifier>: ["u"] <decimal> ["_"] <bytes> (u: punycode)."""
        puny = self.eat("u")
        n = self.decimal()
        self.eat("_")
        raw = self.s[self.i:self.i + n]
        if len(raw) != n:
            raise ValueError("identifier past the end")
        self.i += n
        if puny:
            head, sep, tail = raw.rpartition("_")
            raw = (head + "-" + tail if sep else tail).encode("ascii").decode("punycode")
        return raw

    def backref(self, read):
        start = self.i - 1  # at the "B"
        target = self.base62()
        if target >= start:
            raise ValueError("forward backref")
        saved = self.i
        self.i = target
        try:
            return read()
        finally:
            self.i = saved

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueError("too deep")

    # -- grammar
    def path(self, in_value=True):
        self.enter()
        try:
            return self._path(in_value)
        finally:
            self.depth -= 1

    def _path(self, in_value):
        c = self.next()
        if c == "C":  # crate root
            self.opt_base62("s")
            return self.ident()
        if c == "M":  # <T> (inherent impl)
            self.impl_path()
            return "<%s>" % self.type()
        if c == "X":  # <T as Trait> (trait impl)
            self.impl_path()
            t = self.type()
            return "<%s as %s>" % (t, self.path(False))
        if c == "Y":  # <T as Trait> (trait definition)
            t = self.type()
            return "<%s as %s>" % (t, self.path(False))
        if c == "N":  # nested: namespace, parent, identifier
            ns = self.next()
            parent = self.path(in_value)
            dis = self.opt_base62("s")
            name = self.ident()
            if ns.isupper():  # special namespaces: closures, shims, ...
                kind = {"C": "closure", "S": "shim"}.get(ns, ns)
                return "%s::{%s%s#%d}" % (parent, kind, ":" + name if name else "", dis)
            return "%s::%s" % (parent, name) if name else parent
        if c == "I":  # generic arguments
            prefix = self.path(in_value)
            args = []
            while not self.eat("E"):
                args.append(self.generic_arg())
            return "%s%s<%s>" % (prefix, "::" if in_value else "", ", ".join(args))
        if c == "B":
            return self.backref(lambda: self.path(in_value))
        raise ValueError("bad path tag %r" % c)

    def impl_path(self):
        self.opt_base62("s")
        return self.path()

    def generic_arg(self):
        if self.eat("L"):
            return self.lifetime(self.base62())
        if self.eat("K"):
            return self.const(typed=True)
        return self.type()

    def lifetime(self, index):
        if index == 0:
            return "'_"
        depth = self.bound_lifetimes - index
        if depth < 0:
            raise ValueError("unbound lifetime")
        return "'" + (chr(ord("a") + depth) if depth < 26 else "_%d" % depth)

    def binder(self):
        n = self.opt_base62("G")
        self.bound_lifetimes += n
        return n

    def for_lifetimes(self, n):
        if not n:
            return ""
        names = [self.lifetime(self.bound_lifetimes - k) for k in range(n)]
        return "for<%s> " % ", ".join(names)

    def type(self):
        self.enter()
        try:
            return self._type()
        finally:
            self.depth -= 1

    def _type(self):
        c = self.peek()
        if c in _BASIC_TYPES:
            self.i += 1
            return _BASIC_TYPES[c]
        self.i += 1
        if c == "R" or c == "Q":  # &T, &mut T
            life = ""
            if self.eat("L"):
                index = self.base62()
                life = self.lifetime(index) + " " if index else ""
            return "&%s%s%s" % (life, "mut " if c == "Q" else "", self.type())
        if c == "P":
            return "*const " + self.type()
        if c == "O":
            return "*mut " + self.type()
        if c == "A":
            t = self.type()
            return "[%s; %s]" % (t, self.const())
        if c == "S":
            return "[%s]" % self.type()
        if c == "T":
            items = []
            while not self.eat("E"):
                items.append(self.type())
            return "(%s,)" % items[0] if len(items) == 1 else "(%s)" % ", ".join(items)
        if c == "F":
            return self.fn_sig()
        if c == "D":
            return self.dyn()
        if c == "B":
            return self.backref(self.type)
        self.i -= 1
        return self.path(False)

    def fn_sig(self):
        saved = self.bound_lifetimes
        n = self.binder()
        try:
            head = self.for_lifetimes(n)
            if self.eat("U"):
                head += "unsafe "
            if self.eat("K"):
                abi = "C" if self.eat("C") else self.ident().replace("_", "-")
                head += 'extern "%s" ' % abi
            args = []
            while not self.eat("E"):
                args.append(self.type())
            ret = self.type()
            return "%sfn(%s)%s" % (head, ", ".join(args), "" if ret == "()" else " -> " + ret)
        finally:
            self.bound_lifetimes = saved

    def dyn(self):
        saved = self.bound_lifetimes
        n = self.binder()
        try:
            traits = []
            while not self.eat("E"):
                trait = self.path(False)
                bindings = []
                while self.eat("p"):
                    name = self.ident()
                    bindings.append("%s = %s" % (name, self.type()))
                if bindings:
                    trait = trait[:-1] + ", " + ", ".join(bindings) + ">" if trait.endswith(">") \
                        else "%s<%s>" % (trait, ", ".join(bindings))
                traits.append(trait)
            text = "dyn " + self.for_lifetimes(n) + " + ".join(traits)
        finally:
            self.bound_lifetimes = saved
        if not self.eat("L"):
            raise ValueError("dyn without its lifetime")
        index = self.base62()
        return text + (" + " + self.lifetime(index) if index else "")

    def const(self, typed=False):
        """<const>; an integer generic argument (typed) shows its type: "10: usize"."""
        if self.eat("p"):
            return "_"
        if self.eat("B"):
            return self.backref(lambda: self.const(typed))
        t = self.next()
        negative = self.eat("n")
        start = self.i
        while self.peek() != "_":
            if self.peek() not in "0123456789abcdef":
                raise ValueError("bad const digit")
            self.i += 1
        digits = self.s[start:self.i] or "0"
        self.i += 1  # the "_"
        value = int(digits, 16)
        if t in _UNSIGNED or t in _SIGNED:
            text = str(-value if negative else value)
            return text + ": " + _BASIC_TYPES[t] if typed else text
        if t == "b":
            return {0: "false", 1: "true"}[value]
        if t == "c":
            return repr(chr(value))
        raise ValueError("unsupported const type %r" % t)


def rust_v0(name):
    """A Rust v0-mangled name (``_R...``) demangled, or None if it does not parse."""
    if not name.startswith("_R"):
        return None
    text = name[2:]
    # a vendor-specific suffix (".llvm.123", "$...") is not part of the name
    cut = min((k for k in (text.find("."), text.find("$")) if k >= 0), default=len(text))
    suffix, text = name[2 + cut:], text[:cut]
    if text[:1].isdigit():  # an encoding version: only 0 ("_R" + nothing) is defined
        return None
    p = _V0(text)
    try:
        out = p.path()
        if p.i < len(text):  # the instantiating crate: not shown
            p.path()
    except (ValueError, IndexError, KeyError, UnicodeError, RecursionError):
        return None
    if p.i != len(text):
        return None
    return out + suffix if suffix.startswith("$") else out
