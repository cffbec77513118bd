# cloudfunc deploy-time compiler: runs in a one-shot sandbox over a function's code, mounted
# read-only at /code, and writes to stdout what the host stores in `__pycache__`, so that no
# cold start compiles the function again.
#
# Output: frames of a 4-byte big-endian length and that many bytes. The first is the
# interpreter's cache tag (`cpython-311`); then, for each source that compiles, its path
# under /code, then its `.pyc` (checked-hash: Python still compares it with the source
# before use). A source that does not compile is left out: importing it reports the error.
import os
import py_compile
import sys

LIMIT = int(sys.argv[1])
out = sys.stdout.buffer


def put(data):
    out.write(len(data).to_bytes(4, "big") + data)


tag = sys.implementation.cache_tag
if tag:
    put(tag.encode())
    left = LIMIT
    for root, dirs, files in os.walk("/code"):
        dirs[:] = sorted(
            d for d in dirs if d != "__pycache__" and not os.path.islink(os.path.join(root, d))
        )
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.endswith(".py") or os.path.islink(path) or left == 0:
                continue
            left -= 1
            try:
                py_compile.compile(
                    path,
                    cfile="/tmp/compiled.pyc",
                    dfile=path,
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
                )
            except (py_compile.PyCompileError, OSError, ValueError, RecursionError, MemoryError):
                continue
            with open("/tmp/compiled.pyc", "rb") as f:
                compiled = f.read()
            put(os.path.relpath(path, "/code").encode("utf-8", "surrogateescape"))
            put(compiled)
out.flush()
