'use strict';
// respgw.bootstrap.v1.ExecutionService, the shell part: Execute runs the commands of a shell call
// in the session's directory, each in a bubblewrap sandbox of its own, and streams what happens.
// Written from execution_service.proto alone. It runs no Python (runs_python false: Execute with
// a python action is UNIMPLEMENTED) and has no file or session RPCs (UNIMPLEMENTED, as
// GetExecutionCapabilities says).
//
// The sandbox of one command: new PID, mount, network, IPC and UTS namespaces; /usr read-only
// (with the host's /bin, /lib... links), a private /proc, /dev and /tmp, and the session's
// directory at /mnt/data; a uid of its own per session when the service runs as root (setpriv),
// the service's uid in a user namespace otherwise; prlimit limits on CPU time, memory, processes,
// file size and open files; a wall-clock timeout.

const fs = require('node:fs');
const path = require('node:path');
const { spawn, spawnSync } = require('node:child_process');
const grpc = require('@grpc/grpc-js');

const CHUNK = 64 * 1024;
const MIB = 1024 * 1024;
const TOP_LEVEL = ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32'];

function which(name) {
  for (const dir of (process.env.PATH || '/usr/bin:/bin').split(':')) {
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return '';
}

function duration(seconds) {
  return { seconds: String(Math.floor(seconds)), nanos: Math.round((seconds % 1) * 1e9) };
}

function fromDuration(d) {
  if (!d) return null;
  return Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
}

class Execution {
  constructor({ sessions, limits, CallError }) {
    this.sessions = sessions; // the BootstrapService's registry: live(id, tenant, now)
    this.limits = limits;
    this.CallError = CallError;
    this.asRoot = process.getuid && process.getuid() === 0;
    this.bwrap = which('bwrap');
    this.prlimit = which('prlimit');
    this.setpriv = which('setpriv');
    this.version = '';
    if (this.bwrap && this.prlimit && (!this.asRoot || this.setpriv)) {
      const probe = spawnSync(this.bwrap, ['--version'], { encoding: 'utf8' });
      if (probe.status === 0) this.version = probe.stdout.trim();
    }
  }

  capabilities() {
    const l = this.limits;
    const limits = (timeout) => ({
      timeout: duration(timeout),
      cpu_time: duration(l.cpuS),
      memory_bytes: String(l.memoryBytes),
      max_processes: l.processes,
      max_file_bytes: String(l.fileBytes),
      max_output_bytes: String(l.outputBytes),
      disk_bytes: '0',
    });
    return {
      runs_python: false,
      runs_commands: Boolean(this.version),
      keeps_python_state: false,
      supports_files: false,
      supports_sessions: false,
      default_limits: limits(l.timeoutS),
      max_limits: limits(l.maxTimeoutS),
      max_idle_ttl: duration(0),
      sandbox: this.version,
      implementation: 'respgw-node-example/0.2',
    };
  }

  command(session, argv) {
    const l = this.limits;
    const cmd = [
      '--die-with-parent', '--new-session', '--unshare-pid', '--unshare-net', '--unshare-ipc',
      '--unshare-uts', '--unshare-cgroup-try', '--hostname', 'sandbox',
    ];
    if (!this.asRoot) cmd.push('--unshare-user', '--cap-drop', 'ALL');
    cmd.push('--ro-bind', '/usr', '/usr');
    for (const name of TOP_LEVEL) {
      const host = `/${name}`;
      let info = null;
      try {
        info = fs.lstatSync(host);
      } catch {
        continue;
      }
      if (info.isSymbolicLink()) cmd.push('--symlink', fs.readlinkSync(host), host);
      else if (info.isDirectory()) cmd.push('--ro-bind', host, host);
    }
    cmd.push('--proc', '/proc', '--dev', '/dev', '--perms', '1777', '--size', String(64 * MIB), '--tmpfs', '/tmp');
    cmd.push('--perms', '0755', '--dir', '/mnt', '--bind', session.directory, '/mnt/data', '--chdir', '/mnt/data');
    cmd.push('--clearenv', '--setenv', 'HOME', '/mnt/data', '--setenv', 'PATH', '/usr/local/bin:/usr/bin:/bin');
    cmd.push('--setenv', 'LANG', 'C.UTF-8', '--setenv', 'TMPDIR', '/tmp', '--');
    if (this.asRoot) {
      cmd.push(this.setpriv, `--reuid=${session.uid}`, `--regid=${session.uid}`, '--clear-groups',
        '--inh-caps=-all', '--bounding-set=-all', '--no-new-privs', '--');
    }
    cmd.push(this.prlimit, `--cpu=${l.cpuS}`, `--as=${l.memoryBytes}`, `--nproc=${l.processes}`,
      `--fsize=${l.fileBytes}`, '--nofile=256', '--core=0', '--', ...argv);
    return cmd;
  }

  // Runs one command; resolves with its CommandResult once its output is all sent.
  runOne(session, command, index, timeoutS, maxOutput, write) {
    const l = this.limits;
    return new Promise((resolve) => {
      const started = Date.now();
      const child = spawn(this.bwrap, this.command(session, ['/bin/sh', '-c', command]), {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const counts = { 1: 0, 2: 0 };
      const pump = (stream, kind) => {
        stream.on('data', (data) => {
          const room = maxOutput - counts[kind];
          counts[kind] += data.length;
          for (let at = 0; at < Math.min(room, data.length); at += CHUNK) {
            const piece = data.subarray(at, Math.min(room, data.length, at + CHUNK));
            write({ output: { command_index: index, stream: kind, data: piece } });
          }
        });
      };
      pump(child.stdout, 1);
      pump(child.stderr, 2);
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutS * 1000);
      child.on('close', (code) => {
        clearTimeout(timer);
        const result = {
          command_index: index,
          outcome: 1,
          exit_code: 0,
          limit: 0,
          message: '',
          stdout_bytes: String(counts[1]),
          stderr_bytes: String(counts[2]),
          output_truncated: counts[1] > maxOutput || counts[2] > maxOutput,
          duration: duration((Date.now() - started) / 1000),
        };
        const messages = [];
        if (timedOut) {
          result.outcome = 2;
          messages.push(`It was stopped after ${timeoutS} s (its time limit).`);
        } else if (code === 128 + 24) {
          Object.assign(result, { outcome: 3, limit: 1 });
          messages.push(`It was stopped at its CPU time limit (${l.cpuS} s).`);
        } else if (code === 128 + 25) {
          Object.assign(result, { outcome: 3, limit: 4 });
          messages.push(`It was stopped writing a file larger than ${l.fileBytes / MIB} MiB.`);
        } else if (code === null) {
          Object.assign(result, { outcome: 4 });
          messages.push('The sandbox was killed.');
        } else {
          result.exit_code = code;
        }
        if (result.output_truncated) messages.push(`Output beyond ${maxOutput} bytes per stream was dropped.`);
        result.message = messages.join(' ');
        resolve(result);
      });
    });
  }

  async execute(call) {
    const req = call.request;
    const fail = (code, details) => call.emit('error', { code, details });
    if (!req.tenant) return fail(grpc.status.INVALID_ARGUMENT, 'tenant is required');
    if (!req.session_id) return fail(grpc.status.INVALID_ARGUMENT, 'session_id is required');
    if (!req.action) return fail(grpc.status.INVALID_ARGUMENT, 'python or commands is required');
    if (req.action === 'python') {
      if (!req.python.code.trim()) return fail(grpc.status.INVALID_ARGUMENT, 'python.code is empty');
      return fail(grpc.status.UNIMPLEMENTED, 'this service runs no Python; see GetExecutionCapabilities');
    }
    if (!req.commands.commands.length) return fail(grpc.status.INVALID_ARGUMENT, 'commands.commands is empty');
    const askedTimeout = fromDuration(req.timeout);
    if (askedTimeout !== null && askedTimeout < 0) return fail(grpc.status.INVALID_ARGUMENT, 'timeout is negative');
    const session = this.sessions.live(req.session_id, req.tenant, Date.now());
    if (!session) return fail(grpc.status.NOT_FOUND, `session ${req.session_id} does not exist, expired or was released`);
    if (!this.version) return fail(grpc.status.FAILED_PRECONDITION, 'no sandbox: bwrap and prlimit are needed');
    const l = this.limits;
    const timeoutS = askedTimeout ? Math.min(askedTimeout, l.maxTimeoutS) : l.timeoutS;
    const asked = Number(req.max_output_bytes || 0);
    const maxOutput = asked > 0 ? Math.min(asked, l.outputBytes * 16) : l.outputBytes;
    // Calls of one session run one at a time, in order.
    const previous = session.queue || Promise.resolve();
    let release;
    session.queue = new Promise((r) => { release = r; });
    await previous;
    try {
      session.lastUsed = Date.now();
      const expire = session.lastUsed + this.sessions.idleTtlMs;
      call.write({
        started: {
          session: {
            session_id: session.id,
            name: '',
            kind: session.kind,
            conversation_id: session.conversationId || '',
            create_time: { seconds: String(Math.floor(session.createdAt / 1000)), nanos: 0 },
            last_active_time: { seconds: String(Math.floor(session.lastUsed / 1000)), nanos: 0 },
            expire_time: { seconds: String(Math.floor(expire / 1000)), nanos: 0 },
            idle_ttl: duration(this.sessions.idleTtlMs / 1000),
            memory_limit_bytes: String(l.memoryBytes),
          },
        },
      });
      for (const [index, command] of req.commands.commands.entries()) {
        if (call.cancelled) break;
        const result = await this.runOne(session, command, index, timeoutS, maxOutput, (m) => call.write(m));
        call.write({ command_result: result });
      }
      session.lastUsed = Date.now();
      call.write({ finished: { files_changed: [], interpreter_restarted: false, interpreter_stopped: false } });
      call.end();
    } catch (err) {
      fail(grpc.status.INTERNAL, String(err));
    } finally {
      release();
    }
    return undefined;
  }

  unimplemented() {
    return (call, callback) => {
      const error = { code: grpc.status.UNIMPLEMENTED, details: 'not supported; see GetExecutionCapabilities' };
      if (callback) callback(error);
      else call.emit('error', error);
    };
  }

  handlers() {
    const none = this.unimplemented();
    return {
      GetExecutionCapabilities: (call, callback) => callback(null, this.capabilities()),
      Execute: (call) => {
        this.execute(call);
      },
      CreateSession: none,
      GetSession: none,
      ListSessions: none,
      DeleteSession: none,
      UploadFile: none,
      ListFiles: none,
      GetFile: none,
      DownloadFile: none,
      DeleteFile: none,
    };
  }
}

module.exports = { Execution };
