# cloudfunc Python bootstrap: runs as the sandbox's init process.
#
# The host hands us three pipes: fd 0 carries framed requests, fd 1 carries framed
# replies, fd 2 collects logs. Before any user code runs, the two channels move to
# private descriptors and fd 1 is pointed at the log pipe, so nothing the function
# prints (or any child process it starts) can reach the reply channel.
#
# Frames are a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
# The first request is `init` (which handler to load); every later one is an event.
#
# The bootstrap uses `posix`, built into the interpreter, and not `os`: importing `os` (and
# `_collections_abc` with it) costs about 1.2 ms of every cold start. A function that imports
# `os` pays that itself, and finds in `os.environ` what `setenv` put there.
import _io
import posix
import sys

_PID = posix.getpid()
_REQ = posix.dup(0)
_RES = posix.dup(1)
_null = posix.open("/dev/null", posix.O_RDONLY)
posix.dup2(_null, 0)
posix.close(_null)
posix.dup2(2, 1)


class _WholeWrites(_io.FileIO):
    """Unbuffered output whose writes are whole. A pipe may take part of a write (gVisor's
    host pipes take 64 KiB at a time), and the text layer that `-u` puts straight over the
    file drops whatever a short write left."""

    def write(self, data):
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = _io.FileIO.write(self, view)
            if n is None:
                raise BlockingIOError(11, "write would block", total - len(view))
            view = view[n:]
        return total


def _whole_stream(fd, old):
    raw = _WholeWrites(fd, "w", closefd=False)
    return _io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors, write_through=True)


sys.stdout = _whole_stream(1, sys.stdout)
sys.stderr = _whole_stream(2, sys.stderr)

# Start-up time is the cold start: the stdlib `json` package pulls in `re` (about 10 ms), and
# `traceback` and `inspect` as much again. So JSON goes straight through the C accelerator
# `_json`, and the rest is imported only when a failure or an unusual handler needs it.
try:
    import _json

    class _DecodeContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__

        def __init__(self):
            self.memo = {}

    def loads(text):
        # A fresh scanner per call: its key memo must not carry one call's keys to the next.
        value, end = _json.make_scanner(_DecodeContext())(text, 0)
        if text[end:].strip():
            raise ValueError("extra data after the JSON value")
        return value

    def _no_default(obj):
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    def dumps(obj):
        # A fresh encoder per call: a failed encode may leave entries in its cycle markers.
        # Arguments: markers, default, encoder, indent, key and item separators, sort_keys,
        # skipkeys, allow_nan (NaN is not JSON).
        encode = _json.make_encoder({}, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
        return "".join(encode(obj, 0))

    dumps({"probe": [1, 2.5, None, True, "\u00e9"]})
except (ImportError, TypeError, AttributeError):  # another Python: the slow, sure way
    import json as _stdjson

    loads = _stdjson.loads

    def dumps(obj):
        return _stdjson.dumps(obj, separators=(",", ":"), allow_nan=False)

# The code's directory: /code in a sandbox; benchmarks of the bare host point it elsewhere.
CODE = posix.environ.get(b"CLOUDFUNC_CODE_DIR", b"/code").decode()
MODULE_CANDIDATES = ("function", "handler", "main")
FUNCTION_CANDIDATES = ("handler", "handle", "main")


def read_exact(n, have=b""):
    """`have` and what follows it on the request pipe, `n` bytes in all (None at its end)."""
    chunks = [have]
    n -= len(have)
    while n > 0:
        chunk = posix.read(_REQ, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# What the last read took past the end of its frame (the host sends one frame at a time, so
# normally nothing).
_ahead = b""


def read_frame():
    """The next request. A small frame, the usual one, comes in one read, header and all."""
    global _ahead
    data, _ahead = _ahead or posix.read(_REQ, 65536), b""
    if len(data) < 4:
        data = read_exact(4, data) if data else None
        if data is None:
            return None
    size = int.from_bytes(data[:4], "big")
    body = data[4 : 4 + size]
    _ahead = data[4 + size :]
    if len(body) < size:
        body = read_exact(size, body)
        if body is None:
            return None
    return loads(body.decode())


def write_bytes(data):
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[posix.write(_RES, view):]


def write_frame(obj):
    write_bytes(dumps(obj).encode())


def _exists(path):
    try:
        posix.stat(path)
    except OSError:
        return False
    return True


def setenv(key, value):
    """Sets a variable for the function and the processes it starts: in `os.environ` if `os` is
    loaded, otherwise in the process environment and in `posix.environ`, from which `os`
    builds `os.environ` when it is first imported."""
    loaded = sys.modules.get("os")
    if loaded is not None:
        loaded.environ[key] = value
        return
    posix.putenv(key, value)
    posix.environ[key.encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")


def _text(make):
    """Text about the function's exception, whatever the exception does: its `__str__` may
    raise, or give a string with unpaired surrogates, which are not Unicode (the host refuses
    them): those become U+FFFD."""
    try:
        text = str(make())
    except Exception as exc:  # the function's object, not ours
        text = f"<unprintable {type(exc).__name__}>"
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def describe(exc, kind="raised"):
    import traceback

    return {
        "ok": False,
        "kind": kind,
        "error": {
            "type": _text(lambda: type(exc).__name__),
            "message": _text(lambda: exc),
            "traceback": _text(lambda: "".join(traceback.format_exception(exc))),
        },
    }


class Context:
    """What a handler may learn about its invocation (Lambda-like names)."""

    def __init__(self, meta):
        self.request_id = meta.get("request_id", "")
        self.function_name = meta.get("function_name", "")
        self.function_version = meta.get("function_version", "")
        self.memory_limit_in_mb = meta.get("memory_limit_mb", 0)
        self._deadline_ms = meta.get("deadline_ms", 0)

    def get_remaining_time_in_millis(self):
        import time

        return max(0, int(self._deadline_ms - time.time() * 1000))

    def get(self, key, default=None):
        return getattr(self, key, default)

    def __getitem__(self, key):
        return getattr(self, key)


def load_handler(spec):
    """Resolves `module.function` (either part optional) inside /code."""
    module_name, _, func_name = (spec or "").rpartition(".")
    if not spec:
        module_name, func_name = "", ""
    elif "." not in spec:
        module_name, func_name = "", spec
    sys.path.insert(0, CODE)
    modules = [module_name] if module_name else [
        m for m in MODULE_CANDIDATES if _exists(f"{CODE}/{m}.py")
    ]
    if not modules:
        raise LookupError(
            "no handler module found: add function.py, handler.py or main.py, "
            "or name the module in the manifest"
        )
    # `__import__` rather than `importlib.import_module`: the `importlib` package costs 2 ms
    # to import, on the path of a pre-started sandbox's first call.
    __import__(modules[0])
    module = sys.modules[modules[0]]
    names = [func_name] if func_name else FUNCTION_CANDIDATES
    for name in names:
        func = getattr(module, name, None)
        if callable(func):
            return func, f"{modules[0]}.{name}"
    raise LookupError(
        f"module {modules[0]!r} defines no callable {' or '.join(names)}"
    )


def arity(func):
    code = getattr(func, "__code__", None)
    if code is not None and not getattr(func, "__defaults__", None) and not hasattr(func, "__wrapped__"):
        # A plain function: its code object says how many positional parameters it takes.
        if code.co_flags & 0x04:  # CO_VARARGS
            return 2
        return code.co_argcount - (1 if hasattr(func, "__self__") else 0)
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def invoke(func, nargs, request, max_output):
    args = (request.get("event"), Context(request.get("context") or {}))[: max(nargs, 1)]
    try:
        result = func(*args)
        if hasattr(result, "__await__"):
            import asyncio

            result = asyncio.run(_await(result))
    except BaseException as exc:  # the function's failure is data, not ours
        if isinstance(exc, (KeyboardInterrupt,)):
            raise
        return describe(exc)
    try:
        encoded = dumps(result)
    except Exception as exc:  # not JSON, nested too deep, or the result's own code raised
        return describe(exc, "output_not_serializable")
    if len(encoded) > max_output:
        return {
            "ok": False,
            "kind": "output_too_large",
            "error": {
                "type": "OutputTooLarge",
                "message": f"result is {len(encoded)} bytes; the limit is {max_output}",
                "traceback": "",
            },
        }
    return {"ok": True, "result_json": encoded}


async def _await(awaitable):
    return await awaitable


def _strays():
    """Pids in our pid namespace other than ours."""
    me = str(posix.getpid())
    return [p for p in posix.listdir("/proc") if p.isdigit() and p != me]


# waitpid's __WALL: children of any kind, including those cloned without an exit signal,
# which a plain wait does not see.
_WALL = 0x40000000


def _no_children():
    """Whether init has no child at all, running or exited. Every other process of the pid
    namespace descends from init, so then none is left. One system call, where listing /proc
    cost tens of microseconds on every call."""
    try:
        posix.waitpid(-1, posix.WNOHANG | _WALL)
    except ChildProcessError:
        return True
    return False


def settle():
    """Ends whatever the call left running. Returns False when the sandbox is no longer clean
    (a thread the call started still runs, or a process would not die) and must not serve
    another call."""
    if posix.getpid() != 1:
        # Not a sandbox's init (the bare-host benchmark): never signal anyone.
        return True
    if not _no_children() and _strays():
        try:
            posix.kill(-1, 9)  # from init: every process of the namespace but init itself
        except OSError:
            pass
        # Everything killed is our child or an orphan reparented to us: reap it all.
        import time

        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                pid, _ = posix.waitpid(-1, posix.WNOHANG | _WALL)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.001)
        if _strays():
            return False
    threading = sys.modules.get("threading")
    if threading is None or threading.active_count() <= 1:
        return True
    return all(t.ident in _resting_threads for t in threading.enumerate())


# The threads running once the handler is loaded: the main one, and those the module started
# (an SDK's flush thread, say), which run between calls as they did before the first. Only a
# thread a call started and left running retires the sandbox.
_resting_threads = frozenset()


def _rest():
    global _resting_threads
    import _thread

    threading = sys.modules.get("threading")
    started = [] if threading is None else [t.ident for t in threading.enumerate()]
    _resting_threads = frozenset([_thread.get_ident(), *started])


def _only_the_bootstrap():
    """Ends a process the function forked that has come back into the bootstrap (from the
    handler, or from the module's import: the child was not ended with os._exit). Its reply
    would be read as another call's, and it would compete for the next requests."""
    if posix.getpid() != _PID:
        posix.write(2, b"cloudfunc: a process the function forked came back into the bootstrap and was ended (end a forked child with os._exit)\n")
        posix._exit(0)


def _flush():
    """Flushes what the call printed. The streams are the function's to replace or close
    (`sys.stdout = None`, `sys.stdout.close()`): that is no reason to lose its reply."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _sent_already():
    """Whether the host has written to us already, as it has when a cold start's init frame
    waits; what it wrote becomes the start of the next frame."""
    global _ahead
    posix.set_blocking(_REQ, False)
    try:
        _ahead = posix.read(_REQ, 65536)
    except BlockingIOError:
        return False
    finally:
        posix.set_blocking(_REQ, True)
    return True


def main():
    # The first compile() in a process sets the compiler up (about 0.7 ms). A pre-started
    # sandbox, which waits here for its function, does it now, before the call. A cold start,
    # whose init frame is already there, goes straight on: its function's code is most often
    # compiled already (deploy writes `__pycache__`), and otherwise importing it does the same.
    if not _sent_already():
        compile("def handler(event):\n    return f'{event}'\n", "<warm-up>", "exec")
    init = read_frame()
    if init is None:
        return
    max_output = int(init.get("max_output_bytes", 6 * 1024 * 1024))
    # A pre-started sandbox learns its function's environment only now.
    for key, value in (init.get("env") or {}).items():
        setenv(str(key), str(value))
    try:
        func, resolved = load_handler(init.get("handler"))
        nargs = arity(func)
    except BaseException as exc:
        _only_the_bootstrap()
        write_frame(describe(exc, "init_failed"))
        return
    _only_the_bootstrap()
    _rest()
    write_frame({"ok": True, "ready": True, "handler": resolved, "runtime": sys.version.split()[0]})
    while True:
        request = read_frame()
        if request is None:
            return
        reply = invoke(func, nargs, request, max_output)
        _only_the_bootstrap()
        _flush()
        recycle = "" if settle() else ',"recycle":true'
        if reply.get("ok"):
            # The result is already JSON: splice it in rather than encode it twice.
            write_bytes(('{"ok":true,"result":' + reply["result_json"] + recycle + "}").encode())
        else:
            if recycle:
                reply["recycle"] = True
            write_frame(reply)


main()
