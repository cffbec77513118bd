// cloudfunc Node.js bootstrap: runs as the sandbox's init process.
//
// Node cannot dup2, so the image starts it through `sh -c 'exec node ... 3<&0 4>&1 </dev/null >&2'`:
// fd 3 carries framed requests, fd 4 framed replies, and fds 1 and 2 both reach the log pipe, so
// nothing the function prints (or a child process it starts) can reach the reply channel.
//
// Frames are a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. The first
// request is `init` (which handler to load); every later one is an event.
'use strict';
const fs = require('fs');
const path = require('path');

const REQ = 3;
const RES = 4;
// The code's directory: /code in a sandbox; benchmarks of the bare host point it elsewhere.
const CODE = process.env.CLOUDFUNC_CODE_DIR || '/code';
const MODULE_CANDIDATES = ['index', 'handler', 'function', 'main'];
const FUNCTION_CANDIDATES = ['handler', 'handle', 'main'];

function readExact(n) {
  const buf = Buffer.allocUnsafe(n);
  let off = 0;
  while (off < n) {
    let got;
    try {
      got = fs.readSync(REQ, buf, off, n - off, null);
    } catch (err) {
      if (err.code === 'EAGAIN') continue;
      if (err.code === 'EOF') return null;
      throw err;
    }
    if (got === 0) return null;
    off += got;
  }
  return buf;
}

function readFrame() {
  const head = readExact(4);
  if (head === null) return null;
  const body = readExact(head.readUInt32BE(0));
  if (body === null) return null;
  return JSON.parse(body.toString('utf8'));
}

function writeRaw(json) {
  const body = Buffer.from(json, 'utf8');
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  let off = 0;
  while (off < frame.length) {
    try {
      off += fs.writeSync(RES, frame, off, frame.length - off);
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
    }
  }
}

// Text about what the function threw, whatever it is: a getter or toString may throw, and a
// string may hold unpaired surrogates, which are not Unicode (the host refuses them): those
// become U+FFFD.
function text(make) {
  let made;
  try {
    made = String(make());
  } catch (err) {
    made = '<unprintable>';
  }
  if (typeof made.toWellFormed === 'function') return made.toWellFormed();
  return made.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');
}

function describe(err, kind) {
  const isError = err instanceof Error;
  return {
    ok: false,
    kind: kind || 'raised',
    error: {
      type: text(() => (isError ? err.name : typeof err)),
      message: text(() => (isError ? err.message : err)),
      traceback: isError ? text(() => err.stack || '') : '',
    },
  };
}

async function loadHandler(spec) {
  let moduleName = '';
  let funcName = '';
  if (spec) {
    const dot = spec.lastIndexOf('.');
    if (dot >= 0) {
      moduleName = spec.slice(0, dot);
      funcName = spec.slice(dot + 1);
    } else {
      funcName = spec;
    }
  }
  let file = null;
  const names = moduleName ? [moduleName] : MODULE_CANDIDATES;
  for (const name of names) {
    for (const ext of ['.js', '.cjs', '.mjs']) {
      const candidate = path.join(CODE, name + ext);
      if (fs.existsSync(candidate)) {
        file = candidate;
        break;
      }
    }
    if (file) break;
  }
  if (!file) {
    throw new Error(
      'no handler module found: add index.js, handler.js, function.js or main.js, ' +
        'or name the module in the manifest',
    );
  }
  const mod = file.endsWith('.mjs') ? await import(file) : require(file);
  const funcs = funcName ? [funcName] : FUNCTION_CANDIDATES;
  for (const name of funcs) {
    if (mod && typeof mod[name] === 'function') {
      return [mod[name], `${path.basename(file).replace(/\.[cm]?js$/, '')}.${name}`];
    }
  }
  if (!funcName && typeof mod === 'function') {
    return [mod, path.basename(file).replace(/\.[cm]?js$/, '')];
  }
  // An ES module's `export default`, as `module.exports = fn` is a CommonJS module's.
  if (!funcName && mod && typeof mod.default === 'function') {
    return [mod.default, `${path.basename(file).replace(/\.[cm]?js$/, '')}.default`];
  }
  const orDefault = funcName ? '' : ', and no default function';
  throw new Error(`module ${path.basename(file)} exports no function ${funcs.join(' or ')}${orDefault}`);
}

function makeContext(meta) {
  const deadline = meta.deadline_ms || 0;
  return {
    requestId: meta.request_id || '',
    functionName: meta.function_name || '',
    functionVersion: meta.function_version || '',
    memoryLimitInMB: meta.memory_limit_mb || 0,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
}

// An error the function threw or rejected outside the promise its handler returned (in a
// timer's callback, or a promise nobody awaited). Node's default is to end the process: the
// call in flight died with it, or, for a rejection noticed only after the reply, the next call
// did, with the first call's error in its logs. The call in flight fails with it instead.
let strayError = null;
let failCall = null;
function strayed(err) {
  if (strayError === null) strayError = { err };
  if (failCall) failCall(err);
}
process.on('uncaughtException', strayed);
process.on('unhandledRejection', strayed);

// A handler whose promise nothing is left to settle (no timer, no I/O pending): Node would
// exit with status 0, and the call read as a crash with no word of why. It fails instead.
process.on('beforeExit', () => {
  if (!failCall) return;
  const err = new Error('the promise the handler returned can never settle: nothing it could wait for is left (no timer, no I/O)');
  err.name = 'UnsettledPromise';
  failCall(err);
});

async function invoke(func, request, maxOutput) {
  let result;
  strayError = null;
  try {
    const stray = new Promise((resolve, reject) => {
      failCall = reject;
    });
    result = await Promise.race([func(request.event, makeContext(request.context || {})), stray]);
    // One turn of the event loop, in which Node reports the rejections nobody handled: those
    // of this call are this call's.
    await new Promise((resolve) => setImmediate(resolve));
    if (strayError !== null) throw strayError.err;
  } catch (err) {
    return describe(err);
  } finally {
    failCall = null;
  }
  let encoded;
  try {
    encoded = JSON.stringify(result === undefined ? null : result);
  } catch (err) {
    return describe(err, 'output_not_serializable');
  }
  if (encoded === undefined) {
    return describe(new TypeError(`a ${typeof result} is not JSON-serialisable`), 'output_not_serializable');
  }
  const size = Buffer.byteLength(encoded, 'utf8');
  if (size > maxOutput) {
    return {
      ok: false,
      kind: 'output_too_large',
      error: {
        type: 'OutputTooLarge',
        message: `result is ${size} bytes; the limit is ${maxOutput}`,
        traceback: '',
      },
    };
  }
  return { ok: true, resultJson: encoded };
}

// Node writes to a full pipe by queueing the rest in memory: wait until what the function
// printed has really left, so its logs are complete and belong to this call. Looked at every
// millisecond, not awaited as 'drain': Node sends that only after a write left more queued
// than its mark, so a small remainder behind a full pipe never sent it, and with nothing else
// to wait for Node exited (code 0) without answering the call.
function drained(stream) {
  return new Promise((resolve) => {
    const check = () => (stream.writableLength ? setTimeout(check, 1) : resolve());
    check();
  });
}

// Whether the call left processes behind. If it did, they are killed, and the sandbox asks to
// be retired: Node cannot reap orphans it adopted as init, so it would fill up with zombies.
function settle() {
  if (process.pid !== 1) return true; // not a sandbox's init: never signal anyone
  const me = String(process.pid);
  const strays = fs.readdirSync('/proc').filter((p) => /^[0-9]+$/.test(p) && p !== me);
  if (strays.length === 0) return true;
  try {
    process.kill(-1, 'SIGKILL'); // from init: every process of the namespace but init itself
  } catch (err) {
    // Nothing left to signal.
  }
  return false;
}

// Threads. A Worker a call leaves running runs on between calls (billed to the next, and
// burning the CPU quota while idle), so its sandbox retires, as a Python one with a thread
// left does. The threads are counted at rest once the handler is loaded, and after a call
// only once `worker_threads` is loaded (reading /proc costs about 4 us); the one growth
// allowed is libuv's thread pool, which starts all at once the first time it is needed.
let restingThreads = 0;
let poolMayStart = true;

function threadCount() {
  return fs.readdirSync('/proc/self/task').length;
}

function threadLeft() {
  const loaded = process.moduleLoadList;
  if (Array.isArray(loaded) && !loaded.includes('NativeModule worker_threads')) return false;
  const now = threadCount();
  if (now <= restingThreads) {
    restingThreads = now;
    return false;
  }
  const pool = Number(process.env.UV_THREADPOOL_SIZE);
  const poolSize = Number.isInteger(pool) && pool > 0 ? Math.min(pool, 1024) : 4;
  if (poolMayStart && now === restingThreads + poolSize) {
    poolMayStart = false;
    restingThreads = now;
    return false;
  }
  return true;
}

async function main() {
  const init = readFrame();
  if (init === null) return;
  const maxOutput = Number(init.max_output_bytes || 6 * 1024 * 1024);
  // A pre-started sandbox learns its function's environment only now.
  for (const [key, value] of Object.entries(init.env || {})) {
    process.env[key] = String(value);
  }
  let func;
  let resolved;
  try {
    [func, resolved] = await loadHandler(init.handler);
  } catch (err) {
    writeRaw(JSON.stringify(describe(err, 'init_failed')));
    return;
  }
  restingThreads = threadCount();
  writeRaw(JSON.stringify({ ok: true, ready: true, handler: resolved, runtime: process.version }));
  for (;;) {
    const request = readFrame();
    if (request === null) return;
    const reply = await invoke(func, request, maxOutput);
    await Promise.all([drained(process.stdout), drained(process.stderr)]);
    const recycle = settle() && !threadLeft() ? '' : ',"recycle":true';
    if (reply.ok) {
      writeRaw(`{"ok":true,"result":${reply.resultJson}${recycle}}`);
    } else {
      if (recycle) reply.recycle = true;
      writeRaw(JSON.stringify(reply));
    }
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`cloudfunc bootstrap failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(70);
  },
);
