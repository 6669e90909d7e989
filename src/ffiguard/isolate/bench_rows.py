"""Benchmark rows for isolate mode, for ``python -m ffiguard.bench``.

rows(crashers_path) -> [(name, plain_callable, isolated_callable), ...]; every
callable takes no arguments (functools.partial over the foreign function, so no
Python frame is added on either side).  "plain" is the same call through plain
ctypes in this process; "isolated" goes to a helper process.  The
multiprocessing.Pipe row's "isolated" side is a Pipe round trip to a child process
that makes the same call: compare its time with the isolate row's.

Standalone: ``python -m ffiguard.isolate.bench_rows [--rounds R] [--calls N]`` times
the rows itself (interleaved rounds, median and min per call).
"""
import ctypes
import functools
import multiprocessing
import statistics
import sys
import time

__all__ = ["rows", "main"]

_keep = []  # libraries, child processes and buffers the callables need


def _pipe_server(conn, path):
    lib = ctypes.CDLL(path)
    lib.ffg_add.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.ffg_add.restype = ctypes.c_int
    add = lib.ffg_add
    while True:
        try:
            a, b = conn.recv()
        except EOFError:
            return
        conn.send(add(a, b))


def _pipe_call(conn):
    conn.send((1, 2))
    return conn.recv()


def rows(crashers_path):
    from . import IsolatedCDLL, foreign_buffer

    plain = ctypes.CDLL(crashers_path)
    iso = IsolatedCDLL(crashers_path)
    for lib in (plain, iso):
        lib.ffg_add.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.ffg_add.restype = ctypes.c_int
        lib.ffg_noop.argtypes = []
        lib.ffg_noop.restype = None
    plain_fill = plain["ffg_fill"]
    iso_fill = iso["ffg_fill"]
    for f in (plain_fill, iso_fill):
        f.argtypes = [ctypes.c_void_p, ctypes.c_int]
        f.restype = ctypes.c_int

    buf = ctypes.create_string_buffer(1 << 20)
    fbuf = foreign_buffer(1 << 20)

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_pipe_server, args=(there, crashers_path), daemon=True)
    child.start()
    there.close()
    assert _pipe_call(here) == 3
    _keep.extend([plain, iso, buf, fbuf, child, here])

    return [
        ("isolate ffg_noop()", plain.ffg_noop, iso.ffg_noop),
        ("isolate ffg_add(1, 2)", functools.partial(plain.ffg_add, 1, 2),
         functools.partial(iso.ffg_add, 1, 2)),
        ("multiprocessing.Pipe ffg_add(1, 2) (isolated column: Pipe round trip)",
         functools.partial(plain.ffg_add, 1, 2), functools.partial(_pipe_call, here)),
        ("isolate 1 MiB buffer ffg_fill(buf, 1) (copied in and out)",
         functools.partial(plain_fill, buf, 1), functools.partial(iso_fill, buf, 1)),
        ("isolate 1 MiB foreign_buffer ffg_fill(fbuf, 1) (zero-copy)",
         functools.partial(plain_fill, fbuf, 1), functools.partial(iso_fill, fbuf, 1)),
    ]


def _time(fn, n):
    t = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t) / n


def main(argv=None):
    import argparse
    import ffiguard

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args(argv)
    table = rows(ffiguard.crashers_path())
    print("%-72s %14s %14s" % ("row (median ns/call, min in parentheses)", "plain", "isolated"))
    results = {}
    for name, plain, isolated in table:
        calls = args.calls if "MiB" not in name else max(1, args.calls // 100)
        plain(), isolated()  # warm up (registration, first touch)
        ps, xs = [], []
        for r in range(args.rounds):
            order = [(plain, ps), (isolated, xs)]
            if r % 2:
                order.reverse()
            for fn, out in order:
                out.append(_time(fn, calls))
        results[name] = (statistics.median(ps), min(ps), statistics.median(xs), min(xs))
        print("%-72s %7.0f (%4.0f) %7.0f (%4.0f)" % ((name,) + results[name]))
    add = results["isolate ffg_add(1, 2)"][2]
    pipe = [v for k, v in results.items() if k.startswith("multiprocessing.Pipe")][0][2]
    print("isolate ffg_add: %.2f us per call; Pipe round trip %.2f us; Pipe/isolate = %.1fx"
          % (add / 1000, pipe / 1000, pipe / add))
    print("goal: <= 5 us: %s; >= 8x faster than Pipe: %s" % (add <= 5000, pipe / add >= 8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
