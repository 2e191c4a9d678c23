/**
 * Throwaway PostgreSQL 15 and Mosquitto instances for tests.
 *
 * Every instance lives in its own temp dir, listens on 127.0.0.1 on a spare port and is a
 * direct child process of the test run (never daemonized), so the machine's own PostgreSQL
 * (5432) and Mosquitto (1883) are never touched.
 *
 * Child processes cannot outlive the test run:
 *  - `destroy()` stops the server and removes its temp dir (idempotent);
 *  - an `unload` listener kills whatever is still running and removes the temp dirs;
 *  - children are started through `setpriv --pdeathsig`, so even a SIGKILLed test runner
 *    takes its servers down with it.
 *
 * Needs: --allow-run --allow-read --allow-write --allow-net --allow-env --allow-sys (or -A).
 */

const PG_BIN = "/usr/lib/postgresql/15/bin";
const MOSQUITTO = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd";
const SETPRIV = "/usr/bin/setpriv";
const READY_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 20_000;
const LOG_TAIL_LINES = 40;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/** Paths of PEM files written by {@link makeTestCerts}. Keys are PKCS#8, certs are X.509 v3. */
export interface TestCerts {
  /** Test CA certificate (CA:TRUE). */
  caCert: string;
  /** Test CA private key. */
  caKey: string;
  /** Server cert signed by the CA: SAN DNS:localhost, IP:127.0.0.1, EKU serverAuth. */
  serverCert: string;
  serverKey: string;
  /** Client cert signed by the CA (EKU clientAuth), for mTLS tests. */
  clientCert: string;
  clientKey: string;
  /** Certificate of a second, unrelated CA (for "wrong CA" tests). */
  wrongCaCert: string;
}

export interface MakeTestCertsOptions {
  /** Common name of the client certificate. Default "postgres" (PG cert auth maps CN to user). */
  clientCommonName?: string;
  /**
   * Key algorithm. "ec" (P-256, default) takes ~50 ms for the whole set; "rsa" (2048 bit)
   * ~1 s on this 2-core machine. Both work with rustls (Deno), OpenSSL (postgres, mosquitto).
   */
  keyType?: "ec" | "rsa";
}

export interface StartPostgresOptions {
  /** Enable TLS (ssl=on) with certificates from {@link makeTestCerts}. */
  ssl?: boolean;
  /** Reuse these certificates instead of generating new ones (implies ssl). */
  certs?: TestCerts;
  /** Extra lines appended to postgresql.conf. */
  extraConfig?: string;
  /** Replaces the whole pg_hba.conf content. */
  hba?: string;
}

export interface PgInstance {
  readonly host: "127.0.0.1";
  readonly port: number;
  /** Superuser created by initdb ("postgres"); trust auth, no password. */
  readonly user: string;
  readonly database: string;
  /** `postgres://postgres@127.0.0.1:PORT/postgres` */
  readonly url: string;
  readonly dataDir: string;
  /** Directory holding the unix socket (also the instance's temp dir). */
  readonly socketDir: string;
  /** Server stdout/stderr, appended across restarts. */
  readonly logFile: string;
  readonly certs?: TestCerts;
  /** True while the postmaster child process is alive. */
  readonly running: boolean;
  /** Fast shutdown (SIGINT); waits for the process to exit. No-op if not running. */
  stop(): Promise<void>;
  /** Starts again on the same data dir and port; waits until it accepts connections. */
  start(): Promise<void>;
  /** Immediate shutdown (SIGQUIT: no checkpoint, crash recovery on next start); waits. */
  kill(): Promise<void>;
  /** Stops if running and removes the temp dir. Safe to call more than once. */
  destroy(): Promise<void>;
  /** Current content of the log file. */
  log(): Promise<string>;
}

export interface StartMosquittoOptions {
  /** Extra lines appended to the generated mosquitto.conf (after the listener block). */
  extraConfig?: string;
  /** `persistence true` with persistence_location in the temp dir. */
  persistence?: boolean;
  /** Make the listener TLS-only. */
  tls?: { certs: TestCerts; requireClientCert?: boolean };
  /** Create a password file with this single user and set allow_anonymous false. */
  passwordFile?: { user: string; password: string };
}

export interface MqttInstance {
  readonly host: "127.0.0.1";
  readonly port: number;
  /** "mqtt://127.0.0.1:PORT", or "mqtts://localhost:PORT" with tls. */
  readonly url: string;
  readonly dir: string;
  readonly configFile: string;
  readonly logFile: string;
  readonly running: boolean;
  /** SIGTERM (mosquitto saves persistence on it); waits for exit. No-op if not running. */
  stop(): Promise<void>;
  /** Starts again with the same port, config and persistence dir; waits for the port. */
  start(): Promise<void>;
  /** SIGKILL (nothing saved); waits for exit. */
  kill(): Promise<void>;
  /** Stops if running and removes the temp dir. Safe to call more than once. */
  destroy(): Promise<void>;
  log(): Promise<string>;
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/** An unused TCP port on 127.0.0.1 (bound to port 0, then released). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

const delay = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Resolves true if `p` settles within `ms`, false otherwise; never leaves a timer behind. */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function isRoot(): boolean {
  return Deno.uid() === 0;
}

interface OsUser {
  uid: number;
  gid: number;
}

function lookupUser(name: string): OsUser {
  const passwd = Deno.readTextFileSync("/etc/passwd");
  for (const line of passwd.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f[2] !== undefined && f[3] !== undefined) {
      return { uid: Number(f[2]), gid: Number(f[3]) };
    }
  }
  throw new Error(`OS user "${name}" not found in /etc/passwd`);
}

/** True if `path` exists (handy for asserting that destroy() removed a temp dir). */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

async function tail(path: string, lines = LOG_TAIL_LINES): Promise<string> {
  try {
    const text = await Deno.readTextFile(path);
    return text.trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/** Runs a command to completion; throws with its output when it fails. */
async function run(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: Record<string, string>; clearEnv?: boolean } = {},
): Promise<string> {
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(cmd, { args, stdin: "null", ...opts }).output();
  } catch (e) {
    throw new Error(`cannot run ${cmd}: ${e instanceof Error ? e.message : e}`);
  }
  const dec = new TextDecoder();
  const stdout = dec.decode(out.stdout);
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (exit ${out.code}):\n${stdout}${dec.decode(out.stderr)}`,
    );
  }
  return stdout;
}

/** Copies stream chunks into a file until the stream ends. */
async function pump(stream: ReadableStream<Uint8Array>, file: Deno.FsFile): Promise<void> {
  try {
    for await (const chunk of stream) {
      let off = 0;
      while (off < chunk.length) off += await file.write(chunk.subarray(off));
    }
  } catch {
    // file closed or stream errored: nothing useful to do in a test helper
  }
}

/** Command + args that exec `cmd` (optionally as `user`) with a parent-death signal. */
function wrapped(
  cmd: string,
  args: string[],
  deathSignal: "KILL" | "QUIT",
  user?: string,
): [string, string[]] {
  const pre: string[] = [];
  if (user && isRoot()) pre.push("--reuid", user, "--regid", user, "--init-groups");
  pre.push("--pdeathsig", deathSignal, "--");
  return [SETPRIV, [...pre, cmd, ...args]];
}

// ---------------------------------------------------------------------------------------------
// Process supervision shared by both server kinds
// ---------------------------------------------------------------------------------------------

/** One owned server process with stdout/stderr appended to a log file. */
class Supervised {
  child: Deno.ChildProcess | null = null;
  #exited = false;
  #done: Promise<void> = Promise.resolve();

  constructor(
    readonly name: string,
    readonly logFile: string,
    readonly unloadSignal: Deno.Signal,
  ) {}

  get running(): boolean {
    return this.child !== null && !this.#exited;
  }

  /** Exit code of the last run (null while running or never started). */
  exitCode: number | null = null;

  get pid(): number | undefined {
    return this.running ? this.child?.pid : undefined;
  }

  async spawn(cmd: string, args: string[], env: Record<string, string>, cwd: string) {
    if (this.running) throw new Error(`${this.name} is already running`);
    const file = await Deno.open(this.logFile, { create: true, append: true });
    await file.write(
      new TextEncoder().encode(`\n=== ${new Date().toISOString()} ${cmd} ${args.join(" ")}\n`),
    );
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(cmd, {
        args,
        env,
        clearEnv: true,
        cwd,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
    } catch (e) {
      file.close();
      throw e;
    }
    this.child = child;
    this.#exited = false;
    const pumps = Promise.all([pump(child.stdout, file), pump(child.stderr, file)]);
    this.exitCode = null;
    this.#done = child.status.then(async (status) => {
      this.#exited = true;
      this.exitCode = status.code;
      // orphans of a killed postmaster could keep the pipes open: don't wait forever
      await settlesWithin(pumps, 2000);
      try {
        file.close();
      } catch {
        // already closed
      }
    });
  }

  /** Resolves once the process has exited and its log is flushed. */
  exited(): Promise<void> {
    return this.#done;
  }

  signal(sig: Deno.Signal): void {
    if (!this.running) return;
    try {
      this.child?.kill(sig);
    } catch {
      // already gone
    }
  }

  /** Sends `sig`, waits up to `timeoutMs`, then escalates to SIGKILL. */
  async terminate(sig: Deno.Signal, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
    if (!this.running) return await this.#done;
    this.signal(sig);
    if (!(await settlesWithin(this.#done, timeoutMs))) {
      this.signal("SIGKILL");
      await this.#done;
    }
  }

  /** Synchronous best-effort kill for the unload handler. */
  killSync(): void {
    const pid = this.pid;
    if (pid === undefined) return;
    this.signal(this.unloadSignal);
    waitExitSync(pid, 3000);
  }
}

/** Busy-waits (with short sleeps) until `pid` is a zombie or gone. */
function waitExitSync(pid: number, timeoutMs: number): void {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
      const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      if (state === "Z" || state === "X") return;
    } catch {
      return;
    }
    Atomics.wait(sleeper, 0, 0, 20);
  }
}

// Instances still alive, cleaned up synchronously on unload.
interface Cleanup {
  proc: Supervised;
  dir: string;
}
const live = new Set<Cleanup>();
let unloadRegistered = false;

function track(entry: Cleanup): void {
  live.add(entry);
  if (!unloadRegistered) {
    unloadRegistered = true;
    globalThis.addEventListener("unload", () => {
      for (const e of live) {
        try {
          e.proc.killSync();
        } catch {
          // best effort
        }
        try {
          Deno.removeSync(e.dir, { recursive: true });
        } catch {
          // best effort
        }
      }
      live.clear();
    });
  }
}

let swept = false;

/**
 * Creates an instance temp dir tagged with our pid. The first call also removes instance dirs
 * left behind by test runs that were SIGKILLed (their servers died with them through
 * --pdeathsig, but nothing could remove the dirs).
 */
async function makeInstanceDir(prefix: "sif-pg-" | "sif-mqtt-"): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix });
  await Deno.writeTextFile(`${dir}/owner.pid`, String(Deno.pid));
  if (!swept) {
    swept = true;
    const base = dir.slice(0, dir.lastIndexOf("/"));
    try {
      for await (const e of Deno.readDir(base)) {
        if (!e.isDirectory || !/^sif-(pg|mqtt)-/.test(e.name)) continue;
        const stale = `${base}/${e.name}`;
        let owner: number;
        try {
          owner = Number(await Deno.readTextFile(`${stale}/owner.pid`));
        } catch {
          continue; // not ours, or still being created
        }
        if (owner > 0 && !(await pathExists(`/proc/${owner}`))) {
          await Deno.remove(stale, { recursive: true }).catch(() => {});
        }
      }
    } catch {
      // sweeping is best effort
    }
  }
  return dir;
}

async function waitUntil(
  what: string,
  proc: Supervised,
  probe: () => Promise<boolean>,
  timeoutMs = READY_TIMEOUT_MS,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!proc.running) {
      await proc.exited();
      throw new Error(
        `${what} exited during startup (exit code ${proc.exitCode}); log tail:\n` +
          await tail(proc.logFile),
      );
    }
    if (await probe()) return;
    await delay(50);
  }
  await proc.terminate("SIGKILL", 2000);
  throw new Error(
    `${what} not ready after ${timeoutMs} ms; log tail:\n${await tail(proc.logFile)}`,
  );
}

async function tcpOpen(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

const OPENSSL_CONF = `[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
`;

function randomSerial(): string {
  const b = crypto.getRandomValues(new Uint8Array(12));
  b[0] = (b[0] ?? 0) & 0x7f; // keep it positive
  return "0x" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/**
 * Writes a test PKI into `dir` with the `openssl` CLI: CA, server cert (v3, SAN
 * DNS:localhost + IP:127.0.0.1), client cert, and an unrelated "wrong" CA. Keys are PKCS#8
 * PEM (EC P-256 by default, see {@link MakeTestCertsOptions.keyType}). Certs are mode 0644, keys 0600 owned by the caller (root): copy the server key
 * for a server running as another user (startPostgres does this).
 */
export async function makeTestCerts(
  dir: string,
  opts: MakeTestCertsOptions = {},
): Promise<TestCerts> {
  await Deno.mkdir(dir, { recursive: true });
  const p = (name: string) => `${dir}/${name}`;
  const conf = p("openssl.cnf");
  await Deno.writeTextFile(conf, OPENSSL_CONF);
  const certs: TestCerts = {
    caCert: p("ca.crt"),
    caKey: p("ca.key"),
    serverCert: p("server.crt"),
    serverKey: p("server.key"),
    clientCert: p("client.crt"),
    clientKey: p("client.key"),
    wrongCaCert: p("wrong-ca.crt"),
  };
  const wrongCaKey = p("wrong-ca.key");
  const env = { OPENSSL_CONF: conf };
  const keyArgs = opts.keyType === "rsa"
    ? ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    : ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
  const genKey = (out: string) => run("openssl", ["genpkey", ...keyArgs, "-out", out], { env });
  await Promise.all([certs.caKey, certs.serverKey, certs.clientKey, wrongCaKey].map(genKey));

  const selfSigned = (key: string, cert: string, cn: string) =>
    run("openssl", [
      "req",
      "-new",
      "-x509",
      "-config",
      conf,
      "-extensions",
      "v3_ca",
      "-key",
      key,
      "-out",
      cert,
      "-days",
      "3650",
      "-sha256",
      "-subj",
      `/CN=${cn}`,
      "-set_serial",
      randomSerial(),
    ], { env });
  const signed = async (key: string, cert: string, cn: string, ext: string) => {
    const csr = `${cert}.csr`;
    await run("openssl", [
      "req",
      "-new",
      "-config",
      conf,
      "-key",
      key,
      "-subj",
      `/CN=${cn}`,
      "-out",
      csr,
    ], {
      env,
    });
    await run("openssl", [
      "x509",
      "-req",
      "-in",
      csr,
      "-CA",
      certs.caCert,
      "-CAkey",
      certs.caKey,
      "-set_serial",
      randomSerial(),
      "-days",
      "825",
      "-sha256",
      "-extfile",
      conf,
      "-extensions",
      ext,
      "-out",
      cert,
    ], { env });
    await Deno.remove(csr);
  };

  await Promise.all([
    selfSigned(certs.caKey, certs.caCert, "sif-stream-broker test CA"),
    selfSigned(wrongCaKey, certs.wrongCaCert, "sif-stream-broker WRONG test CA"),
  ]);
  await Promise.all([
    signed(certs.serverKey, certs.serverCert, "localhost", "v3_server"),
    signed(certs.clientKey, certs.clientCert, opts.clientCommonName ?? "postgres", "v3_client"),
  ]);
  for (const f of [certs.caCert, certs.serverCert, certs.clientCert, certs.wrongCaCert]) {
    await Deno.chmod(f, 0o644);
  }
  for (const f of [certs.caKey, certs.serverKey, certs.clientKey, wrongCaKey]) {
    await Deno.chmod(f, 0o600);
  }
  return certs;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

const PG_USER = "postgres";

function defaultHba(): string {
  return [
    "local all all trust",
    "hostssl all all 127.0.0.1/32 trust",
    "host all all 127.0.0.1/32 trust",
    "",
  ].join("\n");
}

function pgEnv(): Record<string, string> {
  return { PATH: `${PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin`, LC_ALL: "C", LANG: "C" };
}

/**
 * initdb's a fresh PostgreSQL 15 cluster in a temp dir (as the `postgres` OS user when we are
 * root) and runs `postgres` as a child process on a spare 127.0.0.1 port, trust auth for
 * everyone, fsync off. With `ssl`, TLS is on with a server cert from {@link makeTestCerts}
 * (returned as `certs`; its CA is also the server's ssl_ca_file for later mTLS tests).
 */
export async function startPostgres(opts: StartPostgresOptions = {}): Promise<PgInstance> {
  const ssl = opts.ssl === true || opts.certs !== undefined;
  const tmp = await makeInstanceDir("sif-pg-");
  const dataDir = `${tmp}/data`;
  const logFile = `${tmp}/postgres.log`;
  const proc = new Supervised("postgres", logFile, "SIGQUIT");
  const entry: Cleanup = { proc, dir: tmp };
  track(entry);
  let destroyed = false;
  let port = 0;

  const destroy = async () => {
    if (destroyed) return;
    destroyed = true;
    try {
      await proc.terminate("SIGINT");
    } finally {
      live.delete(entry);
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  };

  try {
    const pgUser = isRoot() ? lookupUser(PG_USER) : undefined;
    if (pgUser) await Deno.chown(tmp, pgUser.uid, pgUser.gid);
    const asPg = (cmd: string, args: string[]) => wrapped(cmd, args, "QUIT", PG_USER);

    const [initCmd, initArgs] = asPg(`${PG_BIN}/initdb`, [
      "-D",
      dataDir,
      "-A",
      "trust",
      "-U",
      PG_USER,
      "--no-sync",
      "-E",
      "UTF8",
      "--locale=C",
    ]);
    // initdb (~1 s, filesystem-bound) and cert generation overlap
    const [, generated] = await Promise.all([
      run(initCmd, initArgs, { cwd: tmp, env: pgEnv(), clearEnv: true }),
      ssl && !opts.certs ? makeTestCerts(`${tmp}/certs`) : Promise.resolve(undefined),
    ]);

    let certs: TestCerts | undefined;
    const conf: string[] = [
      "",
      "# --- sif-stream-broker test settings ---",
      "listen_addresses = '127.0.0.1'",
      `unix_socket_directories = '${tmp}'`,
      "fsync = off",
      "synchronous_commit = off",
      "full_page_writes = off",
      "logging_collector = off",
      "log_destination = 'stderr'",
    ];
    if (ssl) {
      certs = opts.certs ?? generated;
      if (!certs) throw new Error("unreachable: no certificates");
      // postgres refuses a key that is not 0600 and owned by its user: copy into the data dir
      for (
        const [src, dst] of [
          [certs.serverCert, "server.crt"],
          [certs.serverKey, "server.key"],
          [certs.caCert, "root.crt"],
        ] as const
      ) {
        await Deno.copyFile(src, `${dataDir}/${dst}`);
        await Deno.chmod(`${dataDir}/${dst}`, dst === "server.key" ? 0o600 : 0o644);
        if (pgUser) await Deno.chown(`${dataDir}/${dst}`, pgUser.uid, pgUser.gid);
      }
      conf.push(
        "ssl = on",
        "ssl_cert_file = 'server.crt'",
        "ssl_key_file = 'server.key'",
        "ssl_ca_file = 'root.crt'",
      );
    }
    if (opts.extraConfig) conf.push(opts.extraConfig);
    // port goes last so it wins; rewritten on a port clash at first start
    const writeConf = async () => {
      const base = (await Deno.readTextFile(`${dataDir}/postgresql.conf`)).split(
        "\n# --- sif-stream-broker test settings ---",
      )[0];
      await Deno.writeTextFile(
        `${dataDir}/postgresql.conf`,
        `${base}${conf.join("\n")}\nport = ${port}\n`,
      );
    };
    await Deno.writeTextFile(`${dataDir}/pg_hba.conf`, opts.hba ?? defaultHba());

    const isReady = async () => {
      const out = await new Deno.Command(`${PG_BIN}/pg_isready`, {
        args: [
          "-q",
          "-h",
          "127.0.0.1",
          "-p",
          String(port),
          "-U",
          PG_USER,
          "-d",
          "postgres",
          "-t",
          "1",
        ],
        env: pgEnv(),
        clearEnv: true,
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).output();
      return out.success;
    };
    const start = async () => {
      if (destroyed) throw new Error("postgres instance was destroyed");
      if (proc.running) return;
      const [cmd, args] = asPg(`${PG_BIN}/postgres`, ["-D", dataDir]);
      await proc.spawn(cmd, args, pgEnv(), tmp);
      await waitUntil(`postgres on 127.0.0.1:${port}`, proc, isReady);
    };

    // first start: retry on another port if someone grabbed ours in the meantime
    for (let attempt = 1;; attempt++) {
      port = freePort();
      await writeConf();
      try {
        await start();
        break;
      } catch (e) {
        const clash = /could not (bind|create listen)|Address already in use/i.test(
          await tail(logFile, 10),
        );
        if (!clash || attempt >= 3) throw e;
      }
    }

    const instance: PgInstance = {
      host: "127.0.0.1",
      port,
      user: PG_USER,
      database: "postgres",
      url: `postgres://${PG_USER}@127.0.0.1:${port}/postgres`,
      dataDir,
      socketDir: tmp,
      logFile,
      certs,
      get running() {
        return proc.running;
      },
      stop: () => proc.terminate("SIGINT"),
      start,
      kill: () => proc.terminate("SIGQUIT", 5000),
      destroy,
      log: () => Deno.readTextFile(logFile),
    };
    return instance;
  } catch (e) {
    await destroy();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------------

/**
 * Runs `/usr/sbin/mosquitto -c <temp conf>` as a child process on a spare 127.0.0.1 port
 * (anonymous, unlimited queue by default). Runs as root with `user root` in the config:
 * otherwise mosquitto drops to user `mosquitto` and silently fails to write persistence to
 * the root-owned temp dir.
 */
export async function startMosquitto(opts: StartMosquittoOptions = {}): Promise<MqttInstance> {
  const tmp = await makeInstanceDir("sif-mqtt-");
  const configFile = `${tmp}/mosquitto.conf`;
  const logFile = `${tmp}/mosquitto.log`;
  const proc = new Supervised("mosquitto", logFile, "SIGKILL");
  const entry: Cleanup = { proc, dir: tmp };
  track(entry);
  let destroyed = false;
  let port = 0;

  const destroy = async () => {
    if (destroyed) return;
    destroyed = true;
    try {
      await proc.terminate("SIGTERM");
    } finally {
      live.delete(entry);
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  };

  try {
    let passwordFile: string | undefined;
    if (opts.passwordFile) {
      passwordFile = `${tmp}/passwd`;
      await run(MOSQUITTO_PASSWD, [
        "-b",
        "-c",
        passwordFile,
        opts.passwordFile.user,
        opts.passwordFile.password,
      ]);
      await Deno.chmod(passwordFile, 0o600);
    }
    const writeConf = async () => {
      const lines: string[] = [];
      if (isRoot()) lines.push("user root");
      lines.push(
        "per_listener_settings false",
        `allow_anonymous ${passwordFile ? "false" : "true"}`,
        "max_queued_messages 0",
        "log_dest stderr",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
      );
      if (passwordFile) lines.push(`password_file ${passwordFile}`);
      if (opts.persistence) {
        lines.push("persistence true", `persistence_location ${tmp}/`);
      } else {
        lines.push("persistence false");
      }
      lines.push(`listener ${port} 127.0.0.1`);
      if (opts.tls) {
        lines.push(
          `cafile ${opts.tls.certs.caCert}`,
          `certfile ${opts.tls.certs.serverCert}`,
          `keyfile ${opts.tls.certs.serverKey}`,
          `require_certificate ${opts.tls.requireClientCert ? "true" : "false"}`,
        );
      }
      if (opts.extraConfig) lines.push(opts.extraConfig);
      await Deno.writeTextFile(configFile, lines.join("\n") + "\n");
    };

    const start = async () => {
      if (destroyed) throw new Error("mosquitto instance was destroyed");
      if (proc.running) return;
      const [cmd, args] = wrapped(MOSQUITTO, ["-c", configFile], "KILL");
      await proc.spawn(cmd, args, { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" }, tmp);
      await waitUntil(`mosquitto on 127.0.0.1:${port}`, proc, () => tcpOpen(port));
    };

    for (let attempt = 1;; attempt++) {
      port = freePort();
      await writeConf();
      try {
        await start();
        break;
      } catch (e) {
        const clash = /Address already in use/i.test(await tail(logFile, 10));
        if (!clash || attempt >= 3) throw e;
      }
    }

    const instance: MqttInstance = {
      host: "127.0.0.1",
      port,
      url: opts.tls ? `mqtts://localhost:${port}` : `mqtt://127.0.0.1:${port}`,
      dir: tmp,
      configFile,
      logFile,
      get running() {
        return proc.running;
      },
      stop: () => proc.terminate("SIGTERM"),
      start,
      kill: () => proc.terminate("SIGKILL"),
      destroy,
      log: () => Deno.readTextFile(logFile),
    };
    return instance;
  } catch (e) {
    await destroy();
    throw e;
  }
}
