'use strict';
// A minimal implementation of respgw.bootstrap.v1.BootstrapService, written from the proto alone,
// with the shell part of respgw.bootstrap.v1.ExecutionService beside it (execution.js). It keeps
// its registry in memory: sessions (an id and a working directory each), the response-id ->
// session map that makes a previous_response_id chain reuse its session, and the PrepareTools
// results kept for replays. A restart forgets all of it, as GetCapabilities says.

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { HealthImplementation } = require('grpc-health-check');
const { Execution } = require('./execution');

const SERVICE_NAME = 'respgw.bootstrap.v1.BootstrapService';
const EXECUTION_SERVICE_NAME = 'respgw.bootstrap.v1.ExecutionService';
const KIND = { UNSPECIFIED: 0, CODE_INTERPRETER: 1, SHELL: 2 };
// The kinds this service prepares: kind -> [Responses API tool type, session id prefix].
const SUPPORTED = new Map([
  [KIND.CODE_INTERPRETER, ['code_interpreter', 'cntr_']],
  [KIND.SHELL, ['shell', 'sess_']],
]);

function setting(flag, env, fallback) {
  const i = process.argv.indexOf(flag);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  return process.env[env] || fallback;
}

const LISTEN = setting('--listen', 'BOOTSTRAP_LISTEN', '127.0.0.1:50053');
const PROTOS = setting('--protos', 'BOOTSTRAP_PROTOS_DIR', path.resolve(__dirname, '..', '..', 'protos'));
const IDLE_TTL_MS = Number(setting('--idle-ttl-s', 'BOOTSTRAP_IDLE_TTL_S', '1200')) * 1000;
const MAX_SESSIONS = Number(setting('--max-sessions-per-tenant', 'BOOTSTRAP_MAX_SESSIONS_PER_TENANT', '16'));
// Each session's working directory is made under this folder (a fresh one when not given).
const OWN_WORKDIR = !setting('--workdir', 'BOOTSTRAP_WORKDIR', '');
const WORKDIR = setting('--workdir', 'BOOTSTRAP_WORKDIR', '') || fs.mkdtempSync(path.join(os.tmpdir(), 'respgw-node-sessions-'));
const TIMEOUT_S = Number(setting('--call-timeout-s', 'BOOTSTRAP_CALL_TIMEOUT_S', '60'));
// When the service runs as root, session n runs as uid UID_BASE + n.
const UID_BASE = Number(setting('--sandbox-uid-base', 'BOOTSTRAP_SANDBOX_UID_BASE', '300000'));
// The contract asks for replays to work for at least 10 minutes.
const REPLAY_TTL_MS = 15 * 60 * 1000;

const definition = protoLoader.loadSync(
  ['respgw/bootstrap/v1/bootstrap_service.proto', 'respgw/bootstrap/v1/execution_service.proto'],
  { includeDirs: [PROTOS], keepCase: true, longs: String, defaults: true, oneofs: true },
);
const proto = grpc.loadPackageDefinition(definition).respgw.bootstrap.v1;

const sessions = new Map(); // session id -> {id, tenant, kind, conversationId, lastUsed, directory, uid}
let nextSlot = 1;
const byResponse = new Map(); // tenant \0 response id \0 kind -> session id
const requests = new Map(); // tenant \0 request id -> {fingerprint, response, at}

class CallError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const invalid = (message) => new CallError(grpc.status.INVALID_ARGUMENT, message);

function live(id, tenant, kind, now) {
  const s = id && sessions.get(id);
  return s && s.tenant === tenant && s.kind === kind && now - s.lastUsed <= IDLE_TTL_MS ? s : null;
}

function findConversationSession(tenant, conversationId, kind, now) {
  for (const s of sessions.values()) {
    if (s.tenant === tenant && s.conversationId === conversationId && s.kind === kind && now - s.lastUsed <= IDLE_TTL_MS) return s;
  }
  return null;
}

// Validates the declared tools; returns [{kind, type, container}] in the declared order.
function claims(req) {
  if (!req.tools.length) throw invalid('at least one tool is required');
  const seen = new Set();
  const out = [];
  req.tools.forEach((tool, i) => {
    if (tool.kind === KIND.UNSPECIFIED) throw invalid(`tools[${i}].kind is unspecified`);
    if (seen.has(tool.kind)) throw invalid(`tools[${i}].kind is declared more than once`);
    seen.add(tool.kind);
    let obj = null;
    try {
      obj = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(tool.json));
    } catch {
      obj = null;
    }
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      throw invalid(`tools[${i}].json is not a UTF-8 JSON object`);
    }
    out.push({ kind: tool.kind, container: typeof obj.container === 'string' ? obj.container : '' });
  });
  out.forEach((c, i) => {
    if (!SUPPORTED.has(c.kind)) {
      throw new CallError(grpc.status.UNIMPLEMENTED, `tools[${i}].kind ${c.kind} is not supported; see GetCapabilities`);
    }
  });
  return out;
}

function fingerprint(req) {
  const sorted = (m) => Object.keys(m).sort().map((k) => [k, m[k]]);
  const canonical = JSON.stringify([
    req.tools.map((t) => [t.kind, Buffer.from(t.json).toString('base64')]),
    req.response_id, req.conversation_id, req.previous_response_id,
    sorted(req.headers), sorted(req.metadata),
  ]);
  return crypto.createHash('sha256').update(canonical).digest('hex');
}

function prepare(req) {
  if (!req.request_id) throw invalid('request_id is required');
  if (!req.tenant) throw invalid('tenant is required');
  const wanted = claims(req);
  if (req.conversation_id && req.previous_response_id) {
    throw invalid('conversation_id and previous_response_id cannot both be set');
  }
  const now = Date.now();
  const key = `${req.tenant}\0${req.request_id}`;
  const print = fingerprint(req);
  const earlier = requests.get(key);
  if (earlier && now - earlier.at <= REPLAY_TTL_MS) {
    if (earlier.fingerprint !== print) {
      throw new CallError(grpc.status.ALREADY_EXISTS, `request_id ${req.request_id} was used before with different content`);
    }
    return { ...earlier.response, replayed: true };
  }

  const found = wanted.map((c) => {
    if (c.container) {
      const s = live(c.container, req.tenant, c.kind, now);
      if (!s) throw new CallError(grpc.status.FAILED_PRECONDITION, `session ${c.container} does not exist, expired or was released`);
      return s;
    }
    if (req.conversation_id) return findConversationSession(req.tenant, req.conversation_id, c.kind, now);
    if (req.previous_response_id) {
      return live(byResponse.get(`${req.tenant}\0${req.previous_response_id}\0${c.kind}`), req.tenant, c.kind, now);
    }
    return null;
  });
  const missing = found.filter((s) => !s).length;
  if (missing) {
    let held = 0;
    for (const s of sessions.values()) if (s.tenant === req.tenant && now - s.lastUsed <= IDLE_TTL_MS) held += 1;
    if (held + missing > MAX_SESSIONS) {
      throw new CallError(grpc.status.RESOURCE_EXHAUSTED, `tenant holds ${held} sessions; at most ${MAX_SESSIONS} are allowed`);
    }
  }

  const response = { injected_items: [], prepared: [], replayed: false };
  wanted.forEach((c, i) => {
    let s = found[i];
    if (!s) {
      const id = SUPPORTED.get(c.kind)[1] + crypto.randomBytes(16).toString('hex');
      s = { id, tenant: req.tenant, kind: c.kind, conversationId: req.conversation_id, createdAt: now, directory: path.join(WORKDIR, id), uid: UID_BASE + nextSlot };
      nextSlot += 1;
      fs.mkdirSync(s.directory, { mode: 0o700 });
      if (process.getuid() === 0) fs.chownSync(s.directory, s.uid, s.uid);
      sessions.set(s.id, s);
    }
    s.lastUsed = now;
    if (req.response_id) byResponse.set(`${req.tenant}\0${req.response_id}\0${c.kind}`, s.id);
    const type = SUPPORTED.get(c.kind)[0];
    const text = `The ${type} tool runs in session ${s.id}; it keeps its state across the turns of this conversation.`;
    response.injected_items.push(Buffer.from(JSON.stringify({
      type: 'message', role: 'developer', content: [{ type: 'input_text', text }],
    })));
    const expire = now + IDLE_TTL_MS;
    response.prepared.push({
      kind: c.kind,
      state: Buffer.from(JSON.stringify({ session_id: s.id, kind: type })),
      resource_id: s.id,
      expire_time: { seconds: String(Math.floor(expire / 1000)), nanos: (expire % 1000) * 1e6 },
    });
  });
  requests.set(key, { fingerprint: print, response, at: now });
  return response;
}

function forget(ids) {
  for (const id of ids) {
    const s = sessions.get(id);
    if (s) fs.rmSync(s.directory, { recursive: true, force: true });
    sessions.delete(id);
  }
  for (const [key, id] of byResponse) if (ids.has(id)) byResponse.delete(key);
}

function release(req) {
  if (!req.tenant) throw invalid('tenant is required');
  if (!req.conversation_id && !req.response_id) throw invalid('conversation_id or response_id is required');
  const ids = new Set();
  if (req.conversation_id) {
    for (const s of sessions.values()) if (s.tenant === req.tenant && s.conversationId === req.conversation_id) ids.add(s.id);
  }
  if (req.response_id) {
    const prefix = `${req.tenant}\0${req.response_id}\0`;
    for (const [key, id] of byResponse) if (key.startsWith(prefix)) ids.add(id);
  }
  forget(ids);
  return { released_count: ids.size };
}

function unary(fn) {
  return (call, callback) => {
    try {
      callback(null, fn(call.request));
    } catch (err) {
      if (err instanceof CallError) callback({ code: err.code, details: err.message });
      else callback({ code: grpc.status.INTERNAL, details: String(err) });
    }
  };
}

const sweeper = setInterval(() => {
  const now = Date.now();
  const idle = new Set();
  for (const s of sessions.values()) if (now - s.lastUsed > IDLE_TTL_MS) idle.add(s.id);
  forget(idle);
  for (const [key, r] of requests) if (now - r.at > REPLAY_TTL_MS) requests.delete(key);
}, Math.min(Math.max(IDLE_TTL_MS / 4, 50), 30000));
sweeper.unref();

const execution = new Execution({
  sessions: {
    // A live session of this tenant, of either kind.
    live: (id, tenant, now) => {
      const s = sessions.get(id);
      return s && s.tenant === tenant && now - s.lastUsed <= IDLE_TTL_MS ? s : null;
    },
    idleTtlMs: IDLE_TTL_MS,
  },
  limits: {
    timeoutS: TIMEOUT_S,
    maxTimeoutS: 600,
    cpuS: 60,
    memoryBytes: 1024 * 1024 * 1024,
    processes: 64,
    fileBytes: 256 * 1024 * 1024,
    outputBytes: 1024 * 1024,
  },
});

const server = new grpc.Server();
server.addService(proto.BootstrapService.service, {
  GetCapabilities: unary(() => ({
    tool_kinds: [...SUPPORTED.keys()],
    supports_release: true,
    sessions_survive_restart: false,
    implementation: 'respgw-node-example/0.1',
  })),
  PrepareTools: unary(prepare),
  ReleaseTools: unary(release),
});
server.addService(proto.ExecutionService.service, execution.handlers());
const health = new HealthImplementation({ '': 'SERVING', [SERVICE_NAME]: 'SERVING', [EXECUTION_SERVICE_NAME]: 'SERVING' });
health.addToServer(server);

server.bindAsync(LISTEN, grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    console.error(JSON.stringify({ msg: 'cannot listen', listen: LISTEN, error: err.message }));
    process.exit(1);
  }
  // One JSON line on stdout with the bound port, so a caller that asked for port 0 learns it.
  console.log(JSON.stringify({ msg: 'listening', listen: LISTEN, port }));
});

function shutdown() {
  health.setStatus('', 'NOT_SERVING');
  health.setStatus(SERVICE_NAME, 'NOT_SERVING');
  health.setStatus(EXECUTION_SERVICE_NAME, 'NOT_SERVING');
  const force = setTimeout(() => server.forceShutdown(), 10000);
  force.unref();
  server.tryShutdown(() => {
    // Sessions are forgotten with the process: their directories go too.
    if (OWN_WORKDIR) fs.rmSync(WORKDIR, { recursive: true, force: true });
    else forget(new Set(sessions.keys()));
    process.exit(0);
  });
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
