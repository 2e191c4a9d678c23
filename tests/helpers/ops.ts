/**
 * Helpers for the operations tests (permissions, HTTP, MQTT security, scaling):
 *  - `ProductionProcess` runs `main.ts` as a subprocess with exactly the runtime
 *    flags baked into the binary by the `compile` task of deno.json (read from
 *    there, so the test and the build cannot drift), in a throwaway working
 *    directory (no `.env`), with only the environment the test gives it;
 *  - the local PostgreSQL test database with a schema per test, MQTT publishing
 *    and session cleanup, HTTP GETs and a Prometheus text reader.
 */

import { Buffer } from "node:buffer";
import mqtt from "mqtt";
import postgres from "postgres";

const ROOT = new URL("../../", import.meta.url).pathname;

/** Options of `deno compile` that only shape the build, with whether they take a value. */
const BUILD_ONLY: Record<string, boolean> = {
  "--target": true,
  "-o": true,
  "--output": true,
  "--include": true,
  "--exclude": true,
  "--icon": true,
  "--no-terminal": false,
};

/**
 * The runtime flags of a compile task (permissions and the like). Throws on a
 * word it does not understand, so a new flag is noticed rather than ignored.
 */
export function compileFlags(task = "compile"): string[] {
  const config = JSON.parse(Deno.readTextFileSync(`${ROOT}deno.json`)) as {
    tasks: Record<string, string>;
  };
  const words = (config.tasks[task] ?? "").trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "compile" || words.at(-1) !== "main.ts") {
    throw new Error(`unexpected ${task} task in deno.json: ${config.tasks[task]}`);
  }
  const flags: string[] = [];
  const rest = words.slice(2, -1);
  for (let i = 0; i < rest.length; i++) {
    const w = rest[i]!;
    const name = w.split("=")[0]!;
    if (name in BUILD_ONLY) {
      if (BUILD_ONLY[name] && !w.includes("=")) i++;
    } else if (/^--(allow|deny)-[a-z]+(=\S+)?$/.test(w) || w.startsWith("--v8-flags=")) {
      flags.push(w);
    } else {
      throw new Error(`compileFlags: unknown word "${w}" in the ${task} task`);
    }
  }
  return flags;
}

/** One parsed log line. */
export interface LogLine {
  readonly level: string;
  readonly msg: string;
  readonly [field: string]: unknown;
}

/** `main.ts` running with the production flags. */
export class ProductionProcess {
  readonly lines: LogLine[] = [];
  /** Output that is not a JSON log line (stderr included). */
  readonly other: string[] = [];
  readonly status: Promise<Deno.CommandStatus>;
  readonly #child: Deno.ChildProcess;
  #exited = false;

  private constructor(child: Deno.ChildProcess, cwd: string) {
    this.#child = child;
    const pumps = Promise.all([this.#pump(child.stdout, true), this.#pump(child.stderr, false)]);
    this.status = child.status.then(async (s) => {
      this.#exited = true;
      await Promise.race([pumps, new Promise((r) => setTimeout(r, 2000))]);
      await Deno.remove(cwd, { recursive: true }).catch(() => {});
      return s;
    });
    live.add(this);
    this.status.finally(() => live.delete(this));
  }

  /**
   * Starts `main.ts args` with the flags of `task` and `env` as the whole
   * environment (plus what Deno needs to find its npm cache).
   */
  static start(env: Record<string, string>, args: string[] = [], task = "compile") {
    const cwd = Deno.makeTempDirSync({ prefix: "sif-prod-" });
    const keep = ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"];
    const base: Record<string, string> = { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" };
    for (const k of keep) {
      const v = Deno.env.get(k);
      if (v !== undefined) base[k] = v;
    }
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--config",
        `${ROOT}deno.json`,
        ...compileFlags(task),
        `${ROOT}main.ts`,
        ...args,
      ],
      env: { ...base, ...env },
      clearEnv: true,
      cwd,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    return new ProductionProcess(child, cwd);
  }

  /** Sends a signal unless the process has exited. */
  signal(sig: Deno.Signal): void {
    if (this.#exited) return;
    try {
      this.#child.kill(sig);
    } catch {
      // exited meanwhile
    }
  }

  /** Waits for the exit code; SIGKILLs and throws after `timeoutMs`. */
  async exit(timeoutMs: number): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<null>((r) => (timer = setTimeout(() => r(null), timeoutMs)));
    const s = await Promise.race([this.status, late]);
    clearTimeout(timer);
    if (s) return s.code;
    this.signal("SIGKILL");
    await this.status;
    throw new Error(`no exit within ${timeoutMs} ms; output:\n${this.tail()}`);
  }

  /** Resolves with the first log line matching; throws after `timeoutMs` or on exit. */
  async waitFor(match: string | ((l: LogLine) => boolean), timeoutMs = 15_000): Promise<LogLine> {
    const pred = typeof match === "string" ? (l: LogLine) => l.msg === match : match;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.lines.find(pred);
      if (hit) return hit;
      if (this.#exited || Date.now() > deadline) {
        throw new Error(
          `${this.#exited ? "exited" : "timed out"} before a log line ${match}:\n${this.tail()}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Log lines whose `msg` is `msg`. */
  find(msg: string): LogLine[] {
    return this.lines.filter((l) => l.msg === msg);
  }

  /** Everything printed, for failure messages. */
  tail(n = 40): string {
    return [...this.lines.map((l) => JSON.stringify(l)), ...this.other].slice(-n).join("\n");
  }

  async #pump(stream: ReadableStream<Uint8Array>, json: boolean): Promise<void> {
    let rest = "";
    const take = (line: string) => {
      if (line === "") return;
      if (json) {
        try {
          this.lines.push(JSON.parse(line) as LogLine);
          return;
        } catch {
          // not a log line
        }
      }
      this.other.push(line);
    };
    const dec = new TextDecoder();
    try {
      for await (const chunk of stream) {
        rest += dec.decode(chunk, { stream: true });
        const parts = rest.split("\n");
        rest = parts.pop() ?? "";
        parts.forEach(take);
      }
    } catch {
      // died mid-line
    }
    take(rest);
  }
}

const live = new Set<ProductionProcess>();
globalThis.addEventListener("unload", () => {
  for (const p of live) p.signal("SIGKILL");
});

// ---------------------------------------------------------------------------
// Local services

/** The database the tests write to (never the machine's `postgres`). */
export const TEST_DATABASE = "sif_test";
export const LOCAL_BROKER = "mqtt://127.0.0.1:1883";

/** A short unique lower-case id for names, topics and client ids. */
export function uid(): string {
  return crypto.randomUUID().replaceAll("-", "").slice(0, 12);
}

/** A pool on the local server, session time zone UTC. */
export function adminSql(database = TEST_DATABASE, port = 5432): postgres.Sql {
  return postgres({
    host: "127.0.0.1",
    port,
    user: "postgres",
    database,
    max: 2,
    connect_timeout: 10,
    onnotice: () => {},
    connection: { TimeZone: "UTC", application_name: "sif-test" },
  });
}

/** Creates the test database unless it exists (safe when raced). */
export async function ensureTestDatabase(): Promise<void> {
  const sql = adminSql("postgres");
  try {
    const found = await sql`SELECT 1 FROM pg_database WHERE datname = ${TEST_DATABASE}`;
    if (found.length > 0) return;
    await sql.unsafe(`CREATE DATABASE "${TEST_DATABASE}"`).catch((e) => {
      if (!(e instanceof postgres.PostgresError && ["42P04", "23505"].includes(e.code))) throw e;
    });
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/**
 * A fresh schema holding one app table `readings` (time, metric, value); the
 * service's own tables land there too. Dispose to drop it all.
 */
export async function testSchema(
  sql: postgres.Sql,
): Promise<{ name: string; table: string } & AsyncDisposable> {
  const name = `ops_${uid()}`;
  await sql.unsafe(`CREATE SCHEMA "${name}"`);
  await sql.unsafe(`CREATE TABLE "${name}".readings (time TIMESTAMPTZ NOT NULL,
    metric VARCHAR(128) NOT NULL, value DOUBLE PRECISION NOT NULL)`);
  return {
    name,
    table: `"${name}".readings`,
    [Symbol.asyncDispose]: async () => {
      await sql.unsafe(`DROP SCHEMA IF EXISTS "${name}" CASCADE`);
    },
  };
}

/** One IR message for app `readings` with a single metric. */
export function reading(value: number, metric = "n"): string {
  return JSON.stringify({
    app_id: "readings",
    data: { time: 1700000000 + value / 1000, payload: { [metric]: value } },
  });
}

/** Connects a publisher (QoS 1 publishes wait for the PUBACK). */
export async function publisher(
  url = LOCAL_BROKER,
  options: mqtt.IClientOptions = {},
): Promise<mqtt.MqttClient> {
  return await mqtt.connectAsync(url, {
    clientId: `sif-test-pub-${uid()}`,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    ...options,
  });
}

/** Publishes every payload at QoS 1 and waits for all PUBACKs. */
export async function publishAll(
  client: mqtt.MqttClient,
  topic: string,
  payloads: string[],
): Promise<void> {
  await Promise.all(payloads.map((p) => client.publishAsync(topic, Buffer.from(p), { qos: 1 })));
}

/** Discards a persistent session (clean start, expiry 0) so test sessions do not pile up. */
export async function clearSession(
  clientId: string,
  url = LOCAL_BROKER,
  options: mqtt.IClientOptions = {},
): Promise<void> {
  const c = await mqtt.connectAsync(url, {
    clientId,
    clean: true,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    ...options,
  });
  await c.endAsync();
}

/** Polls until `f` returns a truthy value; throws naming `what` after `timeoutMs`. */
export async function until<T>(
  f: () => T | Promise<T>,
  timeoutMs: number,
  what: string,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// ---------------------------------------------------------------------------
// HTTP and metrics

/** GET `path` on 127.0.0.1:`port`: status, headers and body. */
export async function get(
  port: number,
  path: string,
): Promise<{ status: number; headers: Headers; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, headers: res.headers, body: await res.text() };
}

/** Prometheus text → `name{labels}` → value (comments skipped). */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

/** The sample `key` of a scrape of `port`, or undefined. */
export async function metric(port: number, key: string): Promise<number | undefined> {
  return parseMetrics((await get(port, "/metrics")).body).get(key);
}
