"""shield mode, the interpreter's heap (issue 13): ffiguard.shield_interpreter().

Needs protection keys: the tests that exercise it run inside pku-env (tools/test-pku sets
FFIGUARD_EXPECT_PKU=1, and there they FAIL, not skip, if keys are missing); natively
(no protection keys here) shield_interpreter() must refuse with ShieldUnavailable.
Every test runs in a subprocess: shield_interpreter() stays on for the process.
"""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import ffiguard
from ffiguard.shield import interpreter_availability, mechanism

from conftest import run_python

EXPECT_PKU = os.environ.get("FFIGUARD_EXPECT_PKU") == "1"
AVAILABLE, WHY = interpreter_availability()
# The reason, up to the errno a subprocess may see differently (pkey_alloc's EINVAL or
# ENOSPC where the CPU has no keys).
WHY_PREFIX = WHY.split("(")[0]


def need_pkeys():
    """Skip natively where the interpreter shield cannot exist; fail inside pku-env."""
    if not AVAILABLE:
        if EXPECT_PKU:
            pytest.fail("shield_interpreter() unavailable inside pku-env: %s" % WHY)
        pytest.skip("shield_interpreter() unavailable here: %s" % WHY)


# Prepended to the subprocess snippets (after conftest's PRELUDE): the filler that makes
# pymalloc take new (protected) arenas, and the map of the pages under the key.
HELPERS = r'''
import ctypes.util, json
import ffiguard
from ffiguard import _core

def fill():
    """Use up the free blocks of every size class in the arenas from before, so that
    what is allocated next comes from arenas under the key."""
    keep = [float(i) + 0.5 for i in range(4000)]
    for k in range(48, 513, 16):
        keep += [b"%0*d" % (k - 33, i) for i in range(4000)]
    return keep

def tagged(key):
    """[(start, end)] of the mappings with protection key `key` (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            w = line.split()
            if not w[0].endswith(":"):
                a, b = w[0].split("-")
                cur = (int(a, 16), int(b, 16))
            elif w[0] == "ProtectionKey:" and int(w[1]) == key:
                out.append(cur)
    return out

def inside(ranges, address):
    return any(s <= address < e for s, e in ranges)
'''

# The workload: every way ctypes lets foreign code write Python-owned memory, and
# callbacks. Returns a JSON-able result; also the ctypes objects it made.
WORKLOAD = r'''
try:
    import cffi
except ImportError:
    cffi = None

class Address(int):  # a cffi object's address, among the ctypes objects
    pass

class Utsname(ctypes.Structure):   # 390 bytes: kept in a separate (PyMem) buffer
    _fields_ = [(n, ctypes.c_char * 65) for n in
                ("sysname", "nodename", "release", "version", "machine", "domain")]

def workload(made):
    lib = ffiguard.CDLL(CRASHERS_PATH)
    setup_signatures(lib)
    libc = ffiguard.CDLL(ctypes.util.find_library("c"))
    out = {}
    v = ctypes.c_int(); made.append(v)                     # out-parameter, byref
    lib.ffg_fill(ctypes.byref(v), 7)
    w = ctypes.c_int(); made.append(w)                     # out-parameter, pointer()
    lib.ffg_fill(ctypes.pointer(w), 8)
    out["fill"] = [v.value, w.value]
    end = ctypes.c_char_p(); made.append(end)              # char ** out-parameter
    libc.strtol.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    libc.strtol.restype = ctypes.c_long
    out["strtol"] = [libc.strtol(b"123xyz", ctypes.byref(end), 10), end.value.decode()]
    small = ctypes.create_string_buffer(64); made.append(small)
    big = ctypes.create_string_buffer(1000); made.append(big)
    libc.snprintf(small, 64, b"%d-%s-%.2f", 42, b"abc", ctypes.c_double(3.14159))
    libc.snprintf(big, 1000, b"%0900d", 5)
    out["snprintf"] = [small.value.decode(), big.value[-3:].decode(), len(big.value)]
    p = lib.ffg_make_point(3, 4); made.append(p)           # struct result by value
    out["point"] = [p.x, p.y, lib.ffg_point_sum(Point(5, 6)), lib.ffg_point_sum(p)]
    arr = (ctypes.c_int * 50)(*[(i * 37) % 50 for i in range(50)]); made.append(arr)
    CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                           ctypes.POINTER(ctypes.c_int))
    libc.qsort.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, CMP]
    libc.qsort(arr, 50, 4, CMP(lambda a, b: a[0] - b[0]))  # Python comparator
    out["qsort"] = list(arr)
    out["callback"] = lib.ffg_call_callback(CALLBACK(lambda x: x * 3), 5)
    u = Utsname(); made.append(u)                          # large struct out-parameter
    libc.uname(ctypes.byref(u))
    out["uname"] = u.sysname.decode()
    libc.strchr.restype = ctypes.c_char_p                  # c_char_p result
    out["strchr"] = libc.strchr(b"hello world", ord("w")).decode()
    chars = (ctypes.c_char * 200)(); made.append(chars)   # array written by memset
    libc.memset(chars, ord("z"), 199)
    out["memset"] = chars.value.decode()[:5] + str(len(chars.value))
    b = lib.ffg_make_big(10); made.append(b)               # 32-byte result by value,
    libc.memset(ctypes.byref(b), 1, 8)                     # written afterwards
    copy = Big.from_buffer_copy(bytes(32)); made.append(copy)
    libc.memset(ctypes.byref(copy), 2, 8)
    out["big"] = [b.a, b.b, b.d, copy.a, copy.b]

    class Late(ctypes.Structure):                          # a class made now
        _fields_ = [("text", ctypes.c_char * 40)]
    late = Late(); made.append(late)
    libc.memset(ctypes.byref(late), ord("L"), 39)
    late2 = Late.from_buffer_copy(bytes(40)); made.append(late2)
    libc.memset(ctypes.byref(late2), ord("M"), 39)
    out["late"] = [late.text.decode(), late2.text.decode()]
    with ffiguard.shield.unprotected():                    # other memory, asked for
        ba = bytearray(100)
    libc.memset((ctypes.c_char * 100).from_buffer(ba), ord("q"), 50)
    out["bytearray"] = bytes(ba[:51]).decode("latin-1")
    if cffi is not None:                                   # cffi ABI mode: ffi.new()
        ffi = cffi.FFI()
        ffi.cdef("int ffg_fill(int *out, int value); void *memset(void *, int, size_t);")
        clib = ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH))
        clibc = ffiguard.guard(ffi, ffi.dlopen(None))
        cint, cbuf = ffi.new("int *"), ffi.new("char[100]")  # malloc'd by cffi
        clib.ffg_fill(cint, 9)
        clibc.memset(cbuf, ord("c"), 99)
        made.extend(Address(int(ffi.cast("uintptr_t", c))) for c in (cint, cbuf))
        out["cffi"] = [cint[0], ffi.string(cbuf).decode()]
    return out
'''


def run_guest(code, *args):
    return run_python(HELPERS + WORKLOAD + textwrap.dedent(code), *args, timeout=600)


def test_availability_matches_the_mechanism():
    """Available exactly where protection keys are and this build has a GIL."""
    if EXPECT_PKU:
        assert AVAILABLE, WHY
    elif sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert not AVAILABLE
        assert WHY.startswith("this is a free-threaded build: its objects live in mimalloc")
    elif mechanism()[0] != "pkeys":
        assert not AVAILABLE
        assert WHY.startswith("it needs protection keys, and this machine uses the "
                              "mprotect fallback")


def test_unavailable_raises_with_the_reason():
    """Without protection keys: ShieldUnavailable (an UnsupportedPlatform, a
    RuntimeError) with the reason, nothing changed, no crash."""
    if AVAILABLE:
        pytest.skip("protection keys here: shield_interpreter() works")
    rc, out, err = run_python("""
        import ffiguard
        try:
            ffiguard.shield_interpreter()
        except ffiguard.ShieldUnavailable as e:
            assert isinstance(e, ffiguard.UnsupportedPlatform) and isinstance(e, RuntimeError)
            print("refused:", e.reason)
        print("shielded:", ffiguard.shield.interpreter_shielded(),
              ffiguard._core.shield_stats()["mode"])
    """)
    assert rc == 0, err
    assert "refused: " + WHY_PREFIX in out
    assert "shielded: None 0" in out


def test_workload_same_results():
    """out-parameters, byref, pointer, char** out, string buffers (small and large),
    structs by value (also results > 16 bytes, from_buffer_copy, a class made after
    shield_interpreter(), written through byref), arrays, qsort with a Python
    comparator, callbacks, a 390-byte struct out-parameter, c_char_p results, a
    bytearray made in unprotected(), cffi's ffi.new() (ABI mode; malloc'd, never in
    the arenas): the same with shield_interpreter() as without, and every ctypes object
    made lies outside the protected arenas, while plain objects made just before lie
    inside."""
    need_pkeys()
    rc, out, err = run_guest("""
        before = workload([])
        key = ffiguard.shield_interpreter()
        keep = fill()
        plain = [int("7" * 40) for i in range(500)]
        made = []
        after = workload(made)
        ranges = tagged(key)
        addresses = [int(o) if isinstance(o, Address) else a(o)
                     for o in made for a in (id, ctypes.addressof)]
        print(json.dumps({"before": before, "after": after, "key": key,
                          "ctypes_inside": [hex(a) for a in addresses if inside(ranges, a)],
                          "plain_inside": sum(inside(ranges, id(o)) for o in plain),
                          "stats": _core.shield_heap_stats()}))
    """)
    assert rc == 0, err
    r = json.loads(out.splitlines()[-1])
    assert r["before"] == r["after"]
    assert r["after"]["fill"] == [7, 8] and r["after"]["qsort"] == list(range(50))
    assert r["after"]["callback"] == 16 and r["after"]["strtol"] == [123, "xyz"]
    assert r["after"]["snprintf"] == ["42-abc-3.14", "005", 900]
    assert r["after"]["bytearray"] == "q" * 50 + "\0"
    assert r["key"] >= 1 and r["stats"]["arenas"] > 0
    assert r["ctypes_inside"] == []
    assert r["plain_inside"] > 0  # the heap around them is protected


def test_wild_write_into_a_python_object():
    """A guarded call writing into an int's digits (an object in a protected arena):
    ProtectionKeyViolation with the interpreter's key and the exact address; the int is
    intact; the same call with shield=False writes (into a throwaway copy)."""
    need_pkeys()
    rc, out, err = run_guest("""
        lib = ffiguard.CDLL(CRASHERS_PATH)
        setup_signatures(lib)
        key = ffiguard.shield_interpreter()
        keep = fill()
        ranges = tagged(key)
        candidates = [int("1" * 40) for i in range(500)]
        x = next(c for c in candidates if inside(ranges, id(c)))
        digits = id(x) + 24  # ob_digit: after refcount, type, size (3.10-3.15)
        try:
            lib.ffg_write_at(digits, 0)
            print("NOT RAISED")
        except ffiguard.ProtectionKeyViolation as e:
            print("violation", e.code_name, e.pkey == key, e.address == digits,
                  x == int("1" * 40))
        print("pkru after", hex(_core.shield_pkru() & (3 << (2 * key))))
        victims = [c for c in candidates if inside(ranges, id(c)) and c is not x]
        loose = ffiguard.guard(lib.ffg_write_at, shield=False)
        loose(id(victims[0]) + 24, 0)
        print("unshielded wrote", victims[0] != int("1" * 40))
    """)
    assert rc == 0, err
    assert "violation SEGV_PKUERR True True True" in out, out
    assert "pkru after 0x0" in out
    assert "unshielded wrote True" in out


def test_run_shield(tmp_path):
    """python -m ffiguard run --shield: the program runs with the interpreter shielded
    (a wild write raises); natively it refuses, saying why, before running anything."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import ctypes, ffiguard
        print("shielded:", ffiguard.shield.interpreter_shielded())
    """))
    proc = subprocess.run([sys.executable, "-m", "ffiguard", "run", "--shield", str(script)],
                          capture_output=True, text=True, timeout=600)
    if AVAILABLE:
        assert proc.returncode == 0, proc.stderr
        assert "shielded: " in proc.stdout and "shielded: None" not in proc.stdout
    else:
        if EXPECT_PKU:
            pytest.fail(WHY)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert ("--shield: ffiguard.shield_interpreter() is not available: "
                + WHY_PREFIX) in proc.stderr


def test_doctor_reports_shield_interpreter():
    proc = subprocess.run([sys.executable, "-m", "ffiguard", "doctor"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("shield_interpreter:")]
    assert len(line) == 1
    if AVAILABLE:
        assert line[0].startswith("shield_interpreter: yes: available (protection keys: ")
    else:
        assert line[0].startswith("shield_interpreter: no: " + WHY_PREFIX)


def test_thread_older_than_the_key():
    """A thread started before shield_interpreter() keeps running Python code on objects
    in the new arenas (the handler opens the key for it on its first touch), and a
    callback it runs from a guarded call works too."""
    need_pkeys()
    rc, out, err = run_guest("""
        import threading
        lib = ffiguard.CDLL(CRASHERS_PATH)
        setup_signatures(lib)
        go, done, result = threading.Event(), threading.Event(), {}

        def worker():
            go.wait()
            try:
                fresh = [o for o in shared if inside(ranges, id(o))]
                before = [o["n"] for o in fresh[:50]]
                for o in fresh[:50]:
                    o["n"] += 1                  # writes into protected arenas
                result["inc"] = [o["n"] - b for o, b in zip(fresh, before)] == [1] * 50
                result["fresh"] = len(fresh) >= 50
                result["cb"] = lib.ffg_call_callback(CALLBACK(lambda x: len(str(x * 2))), 500)
                result["pkru"] = _core.shield_pkru() & (3 << (2 * key))
            finally:
                done.set()

        t = threading.Thread(target=worker)
        t.start()
        opened = _core.shield_stats()["opened"]
        key = ffiguard.shield_interpreter()
        keep = fill()
        shared = [{"n": i} for i in range(2000)]
        ranges = tagged(key)
        go.set()
        done.wait(500)
        t.join()
        print(json.dumps(result), _core.shield_stats()["opened"] > opened)
    """)
    assert rc == 0, err
    assert out.splitlines()[-1] == '{"inc": true, "fresh": true, "cb": 5, "pkru": 0} True', out
