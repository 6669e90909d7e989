"""The helper process of isolate mode: loads one library and serves calls to it.

Started by the host (ffiguard.isolate.host) as

    python -S -c "...; from ffiguard.isolate._helper import main; main()" SOCK HOST_PID CTL_FD

with exactly four file descriptors: 0-2 and the SOCK_SEQPACKET socket; CTL_FD (the
control region) and the heap memfd (received from the config) are mapped and closed
at once.  The host sends the configuration as a pickle over the socket; the helper
answers with JSON: ["ready", pid] or ["error", exception description].  Then:

- one worker thread per call slot waits (ffiguard._isolate.serve: spin, then futex)
  for a request, decodes it, calls the library function through ffiguard's trap mode
  (ffiguard.CDLL), and writes the reply into the slot; requests of number-only
  functions are served entirely in C (serve calls the guarded function itself);
- the main thread blocks reading the socket: EOF means the host is gone (or closed the
  library), and the helper exits at once.  PR_SET_PDEATHSIG(SIGKILL) covers a host
  killed while this thread is not scheduled.
"""
import ctypes
import os
import json
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback

PR_SET_PDEATHSIG = 1


def _die_with_host(host_pid):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(71)
    # The host may have died before prctl: then we were already reparented.
    if os.getppid() != host_pid:
        os._exit(72)


def _usage():
    """What this process uses now, in bytes: {"VmData": ..., "VmSize": ...} (the
    kernel checks RLIMIT_DATA against VmData, RLIMIT_AS against VmSize)."""
    used = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmData", "VmSize"):
                used[key] = int(value.split()[0]) * 1024  # "kB"
    return used


def _apply_limits(limits):
    """The limits count what the foreign code uses: "data" and "address_space" are set
    on top of what the helper uses once started (Python, ffiguard, the library loaded,
    the slot threads' stacks, the mappings of the heap and the control region: a
    free-threaded interpreter alone reserves about 1 GiB of data at start-up); "cpu"
    is the process's CPU time, start-up included (a fraction of a second)."""
    import resource
    names = {"address_space": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA,
             "cpu": resource.RLIMIT_CPU}
    used = _usage()
    base = {"address_space": used["VmSize"], "data": used["VmData"], "cpu": 0}
    for key, value in (limits or {}).items():
        res = names[key]
        soft, hard = value if isinstance(value, tuple) else (value, value)
        if key == "cpu" and not isinstance(value, tuple):
            hard = value + 1  # SIGXCPU at the soft limit, SIGKILL a second later
        soft, hard = (v if v == resource.RLIM_INFINITY else v + base[key] for v in (soft, hard))
        resource.setrlimit(res, (soft, hard))


def main():
    sock_fd, host_pid, ctl_fd = (int(a) for a in sys.argv[1:4])
    _die_with_host(host_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the host's business
    sock = socket.socket(fileno=sock_fd)
    try:
        cfg = pickle.loads(sock.recv(1 << 20))
        server = Server(cfg, ctl_fd)
        server.start()
        # Last: the limits count what the foreign code uses from here on.
        _apply_limits(cfg.get("limits"))
    except BaseException as exc:  # report anything, then go
        try:
            from . import _wire
            sock.send(json.dumps(["error", _wire.exception_to_json(exc)]).encode())
        finally:
            os._exit(1)
    sock.send(json.dumps(["ready", os.getpid()]).encode())
    while True:  # the watchdog: EOF when the host closes the socket or dies
        try:
            data = sock.recv(4096)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            os._exit(0)


class Server:
    def __init__(self, cfg, ctl_fd):
        from .. import _isolate
        from . import _wire as W
        self.W = W
        self.exchange = _isolate.exchange
        self.serve_fast = _isolate.serve
        self.nslots, self.slot_size = cfg["slots"], cfg["slot_size"]
        self.ctl_size = W.CONTROL_HEAD + self.nslots * self.slot_size
        self.ctl = _isolate.map_shared(ctl_fd, self.ctl_size)
        os.close(ctl_fd)
        heap_fd = cfg["heap_fd"]
        if heap_fd >= 0:
            _isolate.map_shared(heap_fd, cfg["heap_size"], cfg["heap_base"])
            os.close(heap_fd)
        _isolate.configure(1, cfg["helper_spin_ns"], cfg["spin_limit"], 5000000,
                           cfg["heap_base"] if heap_fd >= 0 else 0)
        self.mem = memoryview((ctypes.c_char * self.ctl_size).from_address(self.ctl)).cast("B")
        import ffiguard
        self.ffiguard = ffiguard
        self.lib = ffiguard.CDLL(cfg["name"], mode=cfg["dlopen_mode"], use_errno=cfg["use_errno"])
        self.use_errno = cfg["use_errno"]
        self.funcs = []
        self.fast = []  # per function id: (guarded function, descriptor) for _isolate.serve, or None
        self.lock = threading.Lock()
        self.local = threading.local()

    def start(self):
        for i in range(self.nslots):
            t = threading.Thread(target=self.serve, args=(i,), name="ffiguard-slot-%d" % i,
                                 daemon=True)
            t.start()

    # ---- the slot loop ---------------------------------------------------------------

    def serve(self, i):
        W = self.W
        base = W.CONTROL_HEAD + i * self.slot_size
        addr = self.ctl + base
        payload = base + W.SLOT_HEAD
        self.local.slot = (addr, base)
        mem = self.mem
        limit = self.slot_size - W.SLOT_HEAD - W.CB_AREA
        head = struct.Struct("=III")  # op, status, req_len at OFF_OP
        serve = self.serve_fast
        fast = self.fast
        fault = self.ffiguard.ForeignFault
        set_state, wait_while = -1, W.IDLE
        while True:
            # C: wait, and answer requests of number-only functions (self.fast) there;
            # back here with CALL for any other request, or with the exception of a
            # fast call that failed (still to be answered).
            try:
                st = serve(addr, set_state, wait_while, fast, limit)
            except BaseException as exc:  # noqa: B902 - every failure goes to the host
                req_len = head.unpack_from(mem, base + W.OFF_OP)[2]
                rep_off = W.align(min(req_len, limit))
                status, n = self.put_json(W.FAULT if isinstance(exc, fault) else W.ERROR,
                                          W.exception_to_json(exc), mem, payload, rep_off, limit)
                W.U32.pack_into(mem, base + W.OFF_STATUS, status)
                W.U32.pack_into(mem, base + W.OFF_REP_LEN, n)
                set_state = wait_while = W.REPLY
                continue
            if st != W.CALL:  # only the host moves a slot to CALL; anything else is noise
                set_state, wait_while = -1, st
                continue
            op, _, req_len = head.unpack_from(mem, base + W.OFF_OP)
            rep_off = W.align(min(req_len, limit))
            try:
                if op & W.ADMIN:
                    status, n = self.admin(op & ~W.ADMIN, mem, payload, req_len, rep_off, limit)
                else:
                    status, n = self.call(op, mem, base, payload, rep_off, limit)
            except BaseException as exc:  # noqa: B902 - every failure goes to the host
                status, n = self.put_json(W.ERROR, W.exception_to_json(exc), mem, payload, rep_off,
                                          limit)
            W.U32.pack_into(mem, base + W.OFF_STATUS, status)
            W.U32.pack_into(mem, base + W.OFF_REP_LEN, n)
            set_state = wait_while = W.REPLY

    def put_json(self, status, obj, mem, payload, rep_off, limit):
        """Replies other than results are JSON: the host never unpickles helper data."""
        data = json.dumps(obj).encode()
        if rep_off + len(data) > limit:
            data = json.dumps(self.W.exception_to_json(RuntimeError(
                "reply too large for the call slot (%d bytes)" % len(data)))).encode()
            status = self.W.ERROR
        mem[payload + rep_off:payload + rep_off + len(data)] = data
        return status, len(data)

    def admin(self, code, mem, payload, req_len, rep_off, limit):
        W = self.W
        request = pickle.loads(bytes(mem[payload:payload + req_len]))
        if code == W.ADMIN_REGISTER:
            result = self.register(*request)
        elif code == W.ADMIN_PING:
            result = request
        elif code == W.ADMIN_EXIT:
            os._exit(0)
        else:
            raise ValueError("unknown admin operation %d" % code)
        return self.put_json(W.OK, result, mem, payload, rep_off, limit)

    # ---- functions ---------------------------------------------------------------------

    def register(self, name, argspecs, resspec):
        """Make the function `name` with these argument/result specs callable by id;
        returns (id, address of the function in the helper)."""
        with self.lock:  # one registration at a time: slot threads run concurrently
            return self._register(name, argspecs, resspec)

    def _register(self, name, argspecs, resspec):
        W = self.W
        fn = self.lib[name]  # AttributeError for a missing symbol goes back to the host
        address = ctypes.cast(fn, ctypes.c_void_p).value
        if argspecs is None:  # a lookup only
            return None, address
        wire_types, decoders, codes = [], [], []
        fast = True
        for k, spec in enumerate(argspecs):
            codes.append(W.wire_code(spec))
            kind = spec[0]
            if kind == "s" and spec[1] in W.SCALAR_CODES:
                wire_types.append(W.build_type(spec))
                decoders.append(None)
            elif kind == "struct":
                t = W.build_type(spec)
                wire_types.append(t)
                decoders.append(t.from_buffer_copy)
                fast = False
            elif kind == "cfunc":
                t = W.build_type(spec)
                wire_types.append(t)
                decoders.append(self.callback_decoder(t, spec, k))
                fast = False
            else:  # pointers
                wire_types.append(ctypes.c_void_p)
                decoders.append("ptr")
                fast = False
        fn.argtypes = wire_types
        res = resspec
        if res is None:
            fn.restype = None
        elif res[0] == "s" and res[1] in W.SCALAR_CODES:
            fn.restype = W.build_type(res)
        elif res[0] == "struct":
            fn.restype = W.build_type(res)
        else:  # c_char_p, c_wchar_p, pointers, function pointers: the raw address
            fn.restype = ctypes.c_void_p
        argst = struct.Struct("@" + "".join(codes))
        resst = struct.Struct("@" + W.wire_code(res)) if res and res[0] in "s" and res[1] in W.SCALAR_CODES else None
        entry = (fn, argst, None if fast else decoders, res, resst, name)
        desc = None if self.use_errno else W.fast_desc(argspecs, res)
        # The entry first, then the fast table: serve() in other threads reads it.
        self.funcs.append(entry)
        self.fast.append((fn, desc) if desc is not None else None)
        return len(self.funcs) - 1, address

    def callback_decoder(self, cftype, spec, k):
        tramp = cftype(self.trampoline(spec, k))
        return tramp  # the decoder's marker: the value -1 means "the host's callable"

    def call(self, fid, mem, base, payload, rep_off, limit):
        W = self.W
        fn, argst, decoders, res, resst, name = self.funcs[fid]
        values = argst.unpack_from(mem, payload)
        if decoders is not None:
            values = list(values)
            slot_addr = self.ctl + payload
            for k, dec in enumerate(decoders):
                if dec is None:
                    continue
                v = values[k]
                if dec == "ptr":
                    if v < 0:
                        off = -v - 1
                        if off >= limit:
                            raise ValueError("argument %d: offset outside the slot" % (k + 1))
                        values[k] = slot_addr + off
                elif isinstance(dec, ctypes._CFuncPtr):
                    values[k] = dec if v == -1 else (None if v == 0 else type(dec)(v))
                else:
                    values[k] = dec(v)
        if self.use_errno:
            ctypes.set_errno(W.I32.unpack_from(mem, base + W.OFF_ERRNO)[0])
        try:
            result = fn(*values)
        except self.ffiguard.ForeignFault as exc:
            return self.put_json(W.FAULT, W.exception_to_json(exc), mem, payload, rep_off, limit)
        finally:
            if self.use_errno:
                W.I32.pack_into(mem, base + W.OFF_ERRNO, ctypes.get_errno())
        if resst is not None:
            resst.pack_into(mem, payload + rep_off, result)
            return W.OK, resst.size
        if res is None:
            return W.OK, 0
        kind = res[0]
        if kind == "struct":
            n = ctypes.sizeof(result)
            if rep_off + n > limit:
                raise ValueError("structure result too large for the call slot")
            ctypes.memmove(self.ctl + payload + rep_off, ctypes.addressof(result), n)
            return W.OK, n
        if kind == "s" and res[1] in "zZ":
            if result is None:
                W.Q.pack_into(mem, payload + rep_off, -1)
                return W.OK, 8
            if res[1] == "z":
                data = ctypes.string_at(result)
            else:
                data = ctypes.wstring_at(result).encode("utf-8", "surrogatepass")
            if rep_off + 8 + len(data) > limit:
                raise ValueError("string result of %d bytes too large for the call slot" % len(data))
            W.Q.pack_into(mem, payload + rep_off, len(data))
            mem[payload + rep_off + 8:payload + rep_off + 8 + len(data)] = data
            return W.OK, 8 + len(data)
        W.Q.pack_into(mem, payload + rep_off, result or 0)  # pointers
        return W.OK, 8

    # ---- callbacks ---------------------------------------------------------------------

    def trampoline(self, spec, k):
        """The Python function behind the helper's C callback for argument k: it asks the
        host (on the slot of the call in progress on this thread) to run its callable."""
        W = self.W
        res, args = spec[1], spec[2]
        argcodes = "".join("q" if a[1] in "Pz" else a[1] for a in args)
        argst = struct.Struct("@" + argcodes)
        rescode = None if res is None else ("q" if res[1] in "Pz" else res[1])
        resst = struct.Struct("@" + rescode) if rescode else None
        strings = [i for i, a in enumerate(args) if a[1] == "z"]
        exchange = self.exchange
        local = self.local
        cb_off = self.slot_size - W.CB_AREA

        def trampoline(*values):
            slot = getattr(local, "slot", None)
            if slot is None:
                print("ffiguard isolate: callback called outside its call; returning 0",
                      file=sys.stderr)
                return 0
            addr, base = slot
            mem = self.mem
            area = base + cb_off
            values = list(values)
            cursor = argst.size
            for i in strings:
                data = values[i]
                if data is None:
                    values[i] = -1
                    continue
                data = data[:W.CB_AREA - 64 - cursor]
                mem[area + cursor:area + cursor + len(data)] = data
                values[i] = cursor | (len(data) << 32)
                cursor += len(data)
            for i, a in enumerate(args):
                if a[1] == "P" and values[i] is None:
                    values[i] = 0
            argst.pack_into(mem, area, *values)
            W.U32.pack_into(mem, base + W.OFF_OP, k)
            st = exchange(addr, W.CB_REQ, W.CB_REQ)
            if st != W.CB_RET:
                return 0
            if resst is None:
                return None
            return resst.unpack_from(mem, area)[0]

        return trampoline


if __name__ == "__main__":
    main()
