/**
 * Runs the service as a real subprocess for fault tests: the same `deno run`
 * flags as the `start` task in deno.json, settings only from the environment
 * (no `.env` is read: the working directory is a temp dir), JSON log lines
 * captured, signals sent on demand, exit awaited with a bound.
 *
 * The child is started through `setpriv --pdeathsig KILL` (when available), so
 * a test runner that dies takes its service processes with it.
 */

import { freePort } from "./servers.ts";

const ROOT = new URL("../../", import.meta.url).pathname;
const SETPRIV = "/usr/bin/setpriv";

/** One parsed log line of the service (`lib/log.ts` writes one JSON object per line). */
export interface LogLine {
  readonly level: string;
  readonly msg: string;
  readonly time: string;
  readonly [field: string]: unknown;
}

export interface ServiceProcessOptions {
  /** PostgreSQL the service writes to. */
  readonly db: { host: string; port: number; user: string; database: string };
  /** Broker URL, e.g. `mqtt://127.0.0.1:PORT`. */
  readonly brokerUrl: string;
  /** Spool folder; keep it across restarts to test replay. */
  readonly stateDir: string;
  /** Stable MQTT client id; keep it across restarts for the persistent session. */
  readonly clientId: string;
  /** Further settings (BATCH_MAX_MESSAGES, SPOOL_MAX_BYTES, ...); win over the defaults. */
  readonly env?: Record<string, string>;
  /** Command-line arguments after `main.ts` (e.g. a channel). */
  readonly args?: readonly string[];
}

export interface ExitStatus {
  readonly code: number;
  readonly signal: Deno.Signal | null;
}

/** The `deno run ...` arguments of the `start` task, with main.ts made absolute. */
export function startTaskArgs(): string[] {
  const config = JSON.parse(Deno.readTextFileSync(`${ROOT}deno.json`)) as {
    tasks: { start: string };
  };
  const words = config.tasks.start.trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "run") {
    throw new Error(`unexpected start task in deno.json: ${config.tasks.start}`);
  }
  const rest = words.slice(2).map((w) => (w.endsWith(".ts") ? `${ROOT}${w}` : w));
  // Outside the project folder Deno would not find deno.json (import map, lock).
  return ["run", "--config", `${ROOT}deno.json`, ...rest];
}

/** A running service subprocess. */
export class ServiceProcess {
  readonly lines: LogLine[] = [];
  /** Whatever the child wrote that is not a JSON log line (stderr, stray output). */
  readonly other: string[] = [];
  readonly status: Promise<ExitStatus>;
  readonly #child: Deno.ChildProcess;
  readonly #cwd: string;
  readonly #pumps: Promise<void>;
  readonly #waiters = new Set<() => void>();
  #exited = false;

  private constructor(child: Deno.ChildProcess, cwd: string, readonly httpPort: number) {
    this.#child = child;
    this.#cwd = cwd;
    this.#pumps = Promise.all([
      this.#pump(child.stdout, true),
      this.#pump(child.stderr, false),
    ]).then(() => {});
    this.status = child.status.then(async (s) => {
      this.#exited = true;
      await settlesWithin(this.#pumps, 2000);
      this.#notify();
      await Deno.remove(this.#cwd, { recursive: true }).catch(() => {});
      return { code: s.code, signal: s.signal };
    });
  }

  /** Starts the service with a throwaway working directory and an explicit environment. */
  static start(o: ServiceProcessOptions): ServiceProcess {
    const cwd = Deno.makeTempDirSync({ prefix: "sif-svc-" });
    const httpPort = freePort();
    const env: Record<string, string> = {
      // What Deno itself needs (npm cache), nothing else from the test's environment.
      ...pick(Deno.env.toObject(), ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]),
      NO_COLOR: "1",
      DENO_NO_UPDATE_CHECK: "1",
      ENV: "DEVELOPMENT",
      INGEST_STREAM: o.brokerUrl,
      TS_HOST: o.db.host,
      TS_PORT: String(o.db.port),
      TS_USER: o.db.user,
      TS_DATABASE: o.db.database,
      PGSSLMODE: "disable",
      STATE_DIR: o.stateDir,
      MQTT_CLIENT_ID: o.clientId,
      HTTP_HOST: "127.0.0.1",
      HTTP_PORT: String(httpPort),
      AUTO_CREATE_TABLES: "false",
      LOG_LEVEL: "info",
      ...o.env,
    };
    const denoArgs = [...startTaskArgs(), ...(o.args ?? [])];
    const usePdeathsig = isFile(SETPRIV);
    const child = new Deno.Command(usePdeathsig ? SETPRIV : Deno.execPath(), {
      args: usePdeathsig ? ["--pdeathsig", "KILL", "--", Deno.execPath(), ...denoArgs] : denoArgs,
      env,
      clearEnv: true,
      cwd,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const proc = new ServiceProcess(child, cwd, httpPort);
    live.add(proc);
    proc.status.finally(() => live.delete(proc));
    return proc;
  }

  get pid(): number {
    return this.#child.pid;
  }

  get running(): boolean {
    return !this.#exited;
  }

  /** Sends a signal; a no-op once the process has exited. */
  signal(sig: Deno.Signal): void {
    if (this.#exited) return;
    try {
      this.#child.kill(sig);
    } catch {
      // exited in the meantime
    }
  }

  /** SIGKILL, then waits for the exit. */
  async kill(): Promise<ExitStatus> {
    this.signal("SIGKILL");
    return await this.status;
  }

  /** Waits for the exit; SIGKILLs and throws when it takes longer than `timeoutMs`. */
  async exit(timeoutMs: number): Promise<ExitStatus> {
    if (await settlesWithin(this.status, timeoutMs)) return await this.status;
    await this.kill();
    throw new Error(`service did not exit within ${timeoutMs} ms; log tail:\n${this.tail()}`);
  }

  /** SIGTERM and wait (bounded); the exit status tells whether shutdown was clean. */
  async stop(timeoutMs = 30_000): Promise<ExitStatus> {
    this.signal("SIGTERM");
    return await this.exit(timeoutMs);
  }

  /**
   * The service's Prometheus metrics (`/metrics` on its HTTP port), unlabelled
   * samples by name. The spool itself is locked by the running service.
   */
  async metrics(): Promise<Map<string, number>> {
    const res = await fetch(`http://127.0.0.1:${this.httpPort}/metrics`);
    const text = await res.text();
    if (!res.ok) throw new Error(`/metrics answered ${res.status}: ${text}`);
    const out = new Map<string, number>();
    for (const line of text.split("\n")) {
      const m = /^([a-zA-Z_:][\w:]*) (\S+)$/.exec(line);
      if (m) out.set(m[1]!, Number(m[2]));
    }
    return out;
  }

  /** Log lines whose `msg` equals `msg` (or that satisfy the predicate). */
  find(match: string | ((l: LogLine) => boolean)): LogLine[] {
    const pred = typeof match === "string" ? (l: LogLine) => l.msg === match : match;
    return this.lines.filter(pred);
  }

  /**
   * Resolves with the first log line (from the start) that matches; throws
   * with the log tail after `timeoutMs` or when the process exits first.
   */
  async waitForLog(
    match: string | ((l: LogLine) => boolean),
    timeoutMs = 15_000,
    after = 0,
  ): Promise<LogLine> {
    const pred = typeof match === "string" ? (l: LogLine) => l.msg === match : match;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.lines.slice(after).find(pred);
      if (hit) return hit;
      if (this.#exited) {
        throw new Error(`service exited before logging ${String(match)}; tail:\n${this.tail()}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `no log line ${String(match)} within ${timeoutMs} ms; tail:\n${this.tail()}`,
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(wake, Math.min(left, 250));
        const waiters = this.#waiters;
        function wake() {
          clearTimeout(t);
          waiters.delete(wake);
          resolve();
        }
        waiters.add(wake);
      });
    }
  }

  /** The last `n` lines of output, for failure messages. */
  tail(n = 30): string {
    const all = [...this.lines.map((l) => JSON.stringify(l)), ...this.other];
    return all.slice(-n).join("\n");
  }

  #notify(): void {
    for (const w of [...this.#waiters]) w();
  }

  async #pump(stream: ReadableStream<Uint8Array>, json: boolean): Promise<void> {
    let rest = "";
    const dec = new TextDecoder();
    const take = (line: string) => {
      if (line === "") return;
      if (json && line.startsWith("{")) {
        try {
          this.lines.push(JSON.parse(line) as LogLine);
          return;
        } catch {
          // not JSON after all
        }
      }
      this.other.push(line);
    };
    try {
      for await (const chunk of stream) {
        rest += dec.decode(chunk, { stream: true });
        const parts = rest.split("\n");
        rest = parts.pop() ?? "";
        for (const p of parts) take(p);
        this.#notify();
      }
    } catch {
      // the process died mid-line: keep what we have
    }
    take(rest);
  }
}

// Processes still running are killed when the test runner unloads.
const live = new Set<ServiceProcess>();
globalThis.addEventListener("unload", () => {
  for (const p of live) p.signal("SIGKILL");
});

function pick(env: Record<string, string>, names: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const n of names) if (env[n] !== undefined) out[n] = env[n];
  return out;
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Resolves true if `p` settles within `ms`; never leaves a timer behind. */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
