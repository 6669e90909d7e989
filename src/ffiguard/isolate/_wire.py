"""What the host and the helper agree on: the call slot layout, the states, and how a
ctypes type is described to the other process (a plain tuple, rebuilt there).

Shared memory layout (one memfd per helper, the "control region"):

    page 0             region header (magic, number of slots, slot size)
    slot i             at CONTROL_HEAD + i * slot_size, 64-byte aligned:
      +0   u32 state   the futex word (IDLE, CALL, REPLY, CB_REQ, CB_RET)
      +4   u32         host sleeps on state
      +8   u32         helper sleeps on state
      +16  u32 op      CALL: function id, or ADMIN | admin code; CB_REQ: callback index
      +20  u32 status  of a reply: OK, FAULT, ERROR
      +24  u32 req_len bytes of request in the payload (the reply starts after it)
      +28  u32 rep_len bytes of reply
      +32  i32 errno   after the call (use_errno)
      +128 payload     request, then reply;  the last CB_AREA bytes: callback messages

The foreign heap (ffiguard.isolate.foreign_buffer) is another memfd, one per host,
mapped at the same address in the host and in every helper, so a pointer into it
means the same thing on both sides (zero-copy).
"""
import ctypes
import struct

MAGIC = 0xFF6A150C
CONTROL_HEAD = 4096
SLOT_HEAD = 128
CB_AREA = 4096

# Slot states (the futex word).
IDLE, CALL, REPLY, CB_REQ, CB_RET = 0, 1, 2, 3, 4
# Reply status.
OK, FAULT, ERROR = 0, 1, 2
# Admin operations: op = ADMIN | code; payload and reply are pickles.
ADMIN = 0x80000000
ADMIN_REGISTER, ADMIN_PING, ADMIN_EXIT = 1, 2, 3

HEAD = struct.Struct("=IIIIIIIIi")  # state, sleeping x2, pad, op, status, req_len, rep_len, errno
OFF_OP, OFF_STATUS, OFF_REQ_LEN, OFF_REP_LEN, OFF_ERRNO = 16, 20, 24, 28, 32
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
Q = struct.Struct("=q")


def align(n, a=16):
    return (n + a - 1) & ~(a - 1)


# ---- describing ctypes types ------------------------------------------------------

# Simple type codes whose values travel as plain numbers (struct module, native mode).
SCALAR_CODES = frozenset("bBhHiIlLqQfd?c")
SIMPLE_BY_CODE = {
    "b": ctypes.c_byte, "B": ctypes.c_ubyte, "h": ctypes.c_short, "H": ctypes.c_ushort,
    "i": ctypes.c_int, "I": ctypes.c_uint, "l": ctypes.c_long, "L": ctypes.c_ulong,
    "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong, "f": ctypes.c_float, "d": ctypes.c_double,
    "?": ctypes.c_bool, "c": ctypes.c_char, "P": ctypes.c_void_p, "z": ctypes.c_char_p,
    "Z": ctypes.c_wchar_p, "g": ctypes.c_longdouble, "u": ctypes.c_wchar,
}

_SimpleCData = ctypes.c_int.__mro__[1]
_Pointer = ctypes.POINTER(ctypes.c_int).__mro__[1]
_CFuncPtr = ctypes._CFuncPtr


class Unsupported(TypeError):
    """A type isolate mode cannot carry to the helper."""


def spec_of(t, where="type"):
    """The picklable description of ctypes type `t` (None for restype None)."""
    if t is None:
        return None
    if isinstance(t, type):
        if issubclass(t, _SimpleCData):
            code = t._type_
            if code not in SIMPLE_BY_CODE or code in "gu":
                raise Unsupported("isolate mode does not support %s %s" % (where, t.__name__))
            return ("s", code)
        if issubclass(t, (ctypes.Structure, ctypes.Union)):
            fields = []
            for f in t._fields_:
                name, ftype = f[0], f[1]
                bits = f[2] if len(f) > 2 else 0
                fields.append((name, field_spec(ftype, where), bits))
            return ("struct", t.__name__, issubclass(t, ctypes.Union),
                    getattr(t, "_pack_", 0), tuple(fields), ctypes.sizeof(t))
        if issubclass(t, ctypes.Array):
            return ("array", field_spec(t._type_, where), t._length_)
        if issubclass(t, _Pointer):
            return ("ptr", ctypes.sizeof(t._type_) if _sizable(t._type_) else 0)
        if issubclass(t, _CFuncPtr):
            if t._flags_ & ctypes._FUNCFLAG_PYTHONAPI:
                raise Unsupported("isolate mode does not support PYFUNCTYPE callbacks")
            args = tuple(callback_arg_spec(a) for a in (t._argtypes_ or ()))
            res = callback_arg_spec(t._restype_) if t._restype_ is not None else None
            return ("cfunc", res, args, t._flags_)
    raise Unsupported("isolate mode does not support %s %r" % (where, t))


def _sizable(t):
    try:
        ctypes.sizeof(t)
        return True
    except TypeError:
        return False


def field_spec(t, where):
    """Spec of a Structure field or array element: pointer-like fields keep only their
    size and alignment (the helper sees them as c_void_p)."""
    if isinstance(t, type) and (issubclass(t, (_Pointer, _CFuncPtr)) or (
            issubclass(t, _SimpleCData) and t._type_ in "zZ")):
        return ("ptrfield",)
    return spec_of(t, where)


def callback_arg_spec(t):
    s = spec_of(t, "callback type")
    if s[0] != "s" or s[1] == "Z":
        raise Unsupported("isolate mode callbacks take and return simple numbers, "
                          "c_void_p and c_char_p only, not %r" % (t,))
    return s


def has_pointers(spec):
    kind = spec[0]
    if kind == "ptrfield":
        return True
    if kind == "struct":
        return any(has_pointers(f[1]) for f in spec[4])
    if kind == "array":
        return has_pointers(spec[1])
    return False


_struct_cache = {}


def build_type(spec):
    """The ctypes type for a spec, in this process (Structures are rebuilt once)."""
    kind = spec[0]
    if kind == "s":
        return SIMPLE_BY_CODE[spec[1]]
    if kind in ("ptrfield", "ptr"):
        return ctypes.c_void_p
    if kind == "array":
        return build_type(spec[1]) * spec[2]
    if kind == "struct":
        t = _struct_cache.get(spec)
        if t is None:
            base = ctypes.Union if spec[2] else ctypes.Structure
            ns = {}
            if spec[3]:
                ns["_pack_"] = spec[3]
            t = type(spec[1], (base,), ns)
            t._fields_ = [(n, build_type(s), b) if b else (n, build_type(s)) for n, s, b in spec[4]]
            if ctypes.sizeof(t) != spec[5]:
                raise Unsupported("structure %s rebuilt with a different size" % spec[1])
            _struct_cache[spec] = t
        return t
    if kind == "cfunc":
        res, args, flags = spec[1], spec[2], spec[3]
        factory = ctypes.CFUNCTYPE
        return factory(build_type(res) if res else None, *[build_type(a) for a in args],
                       use_errno=bool(flags & ctypes._FUNCFLAG_USE_ERRNO))
    raise Unsupported("unknown type spec %r" % (spec,))


def wire_code(spec):
    """struct code of one argument or result on the wire."""
    kind = spec[0]
    if kind == "s" and spec[1] in SCALAR_CODES:
        return spec[1]
    if kind in ("s", "ptr", "cfunc", "array"):  # pointers: one signed word (see host)
        return "q"
    if kind == "struct":
        return "%ds" % spec[5]
    raise Unsupported("cannot pass %r" % (spec,))


# ---- the scalar fast path ---------------------------------------------------------------

FAST_MAXARGS = 24
FAST_ARG_CODES = frozenset("bBhHiIlLqQfd?cP")  # P: c_void_p given as a plain int or None
FD_STRICT = 1


def fast_desc(specs, res, inferred=False):
    """The descriptor of a signature the C fast path (ffiguard._isolate) can take, or
    None: bytes [nargs, result code or 0, size of the packed arguments, flags] then
    (code, offset) per argument.  The layout is struct's "@" layout of the wire codes,
    so the Python path and the C path agree byte for byte.  `inferred`: the types came
    from the values (no argtypes); only all-c_int signatures qualify then, and only
    exact ints take the C path (so the C path never has to guess a type)."""
    if len(specs) > FAST_MAXARGS:
        return None
    codes = []
    for s in specs:
        if s[0] != "s" or s[1] not in FAST_ARG_CODES:
            return None
        codes.append(s[1])
    if inferred and any(c != "i" for c in codes):
        return None
    if res is not None and (res[0] != "s" or res[1] not in SCALAR_CODES):
        return None
    wire = "".join("q" if c == "P" else c for c in codes)
    size = struct.calcsize("@" + wire)
    if size > 255:
        return None
    out = [len(codes), ord(res[1]) if res is not None else 0, size, FD_STRICT if inferred else 0]
    for k, c in enumerate(codes):
        out += [ord(c), struct.calcsize("@" + wire[:k + 1]) - struct.calcsize(wire[k])]
    return bytes(out)


# ---- replies from the helper: JSON, never pickle (the host must not trust them) ----------

_FAULT_FIELDS = ("message", "code", "code_name", "address", "access", "pc", "sp", "function",
                 "library", "symbol", "frames")
_ERRORS = ("AttributeError", "OSError", "TypeError", "ValueError", "ArgumentError",
           "MemoryError", "OverflowError", "RuntimeError", "NotImplementedError")


def exception_to_json(exc):
    """Helper side: a JSON-able description of an exception (a ForeignFault with every
    field of its record, computed in the helper where the addresses mean something)."""
    import ffiguard
    if isinstance(exc, ffiguard.ForeignFault):
        fields = {name: getattr(exc, name) for name in _FAULT_FIELDS}
        sig = exc.signal
        fields["signal"] = int(sig) if sig is not None else None
        fields["registers"] = dict(exc.registers or {})
        return {"fault": type(exc).__name__, "fields": fields}
    return {"error": type(exc).__name__, "message": str(exc)[:2000],
            "errno": getattr(exc, "errno", None)}


def exception_from_json(d):
    """Host side: rebuild the exception; class names come from fixed lists only."""
    import signal as _signal
    from .. import faults
    if "fault" in d:
        cls = getattr(faults, str(d["fault"]), None)
        if not (isinstance(cls, type) and issubclass(cls, faults.ForeignFault)):
            cls = faults.ForeignFault
        fields = {k: v for k, v in dict(d["fields"]).items()
                  if k in _FAULT_FIELDS or k in ("signal", "registers")}
        sig = fields.get("signal")
        if sig is not None:
            try:
                fields["signal"] = _signal.Signals(int(sig))
            except ValueError:
                pass
        message = fields.pop("message", None)
        return cls(None if message is None else str(message), **fields)
    name, message = str(d.get("error")), str(d.get("message"))
    if name == "ArgumentError":
        return ctypes.ArgumentError(message)
    if name in _ERRORS:
        import builtins
        cls = getattr(builtins, name)
        if cls is OSError and d.get("errno") is not None:
            return OSError(int(d["errno"]), message)
        return cls(message)
    return RuntimeError("%s in the isolate helper: %s" % (name, message))
