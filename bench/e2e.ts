/**
 * End-to-end benchmark: `deno task bench [options]`.
 *
 * Starts its own Mosquitto (configured so that it never drops: unlimited
 * queues and in-flight window), runs the service as a subprocess the way
 * production does (`main.ts` with the start task's flags, a fresh STATE_DIR),
 * publishes IR messages at QoS 1 from a separate process and reads the
 * result back from PostgreSQL: messages/s and rows/s from the first publish
 * to the last commit, lost and duplicated messages, publish-to-commit
 * latency, the service's peak RSS, and CPU time per process (which stage
 * limits). The naive baseline (bench/baseline.ts) runs on the same workload
 * in the same run. Everything lives in a fresh schema that is dropped at the
 * end.
 *
 * Latency: each message carries its publish time as `data.time`, so the row's
 * `time` column is the publish time (microseconds). The bench table has a
 * column `committed DEFAULT clock_timestamp()`: the time each row was
 * inserted. The service writes a batch in one transaction, so a row's own
 * clock_timestamp() is earlier than its commit by the rest of the batch; the
 * benchmark therefore takes, for every transaction (rows with the same xmin),
 * the latest clock_timestamp() of all its rows: that is the end of the
 * transaction's last INSERT, and the commit follows after one small upsert
 * and the WAL flush (the residual error, measured and printed as "commit
 * cost"). now() would be worse: it is the transaction's start.
 *
 * Options:
 *   --messages N        messages per run (default 100000)
 *   --duration S        soak: the half-rate run lasts S seconds instead (RSS sampled every 5 s)
 *   --rate R            take R messages/s as the maximum instead of measuring it
 *   --phases LIST       comma-separated, in order: broker,max,baseline,half,outage
 *                       (default broker,max,baseline,half; broker = publisher to a consumer
 *                       that only acknowledges: the ceiling of broker + mqtt.js here)
 *   --outage            add the outage run (a throwaway PostgreSQL is stopped for a while)
 *   --outage-seconds S  length of the outage (default 10)
 *   --pg throwaway      run everything on a throwaway PostgreSQL (fsync on) instead of 127.0.0.1:5432
 *   --profile           write a V8 CPU profile of the service for each run and print the top functions
 *   --inflight N        Mosquitto max_inflight_messages (default 0: unlimited)
 *   --keep              keep the bench schema (for inspection)
 *   --quiet-wait S      before each run, wait up to S seconds for the machine to be idle
 *   --memory-detail     print the service's resident memory by mapping at the end of each run
 *   --publisher mqttjs  publish with mqtt.js instead of the lean raw MQTT 3.1.1 client
 *
 * Environment: BATCH_MAX_MESSAGES, BATCH_MAX_WAIT_MS and SPOOL_SYNC_FULL are
 * passed on to the service; BENCH_SERVICE_FLAGS adds Deno flags to the
 * service's command line (diagnostics, e.g. `--v8-flags=--trace-gc`).
 */

import { parseArgs } from "node:util";
import { join } from "node:path";
import postgres from "postgres";
import { type PgInstance, startMosquitto, startPostgres } from "../tests/helpers/servers.ts";
import {
  Child,
  cpuSeconds,
  localTcpPorts,
  memory,
  pidsWithCommandLine,
  residentByMapping,
} from "./proc.ts";
import { createTableSql, ROWS_PER_MESSAGE } from "./workload.ts";
import { topFunctions } from "./profile.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const DENO = Deno.execPath();

interface Db {
  host: string;
  port: number;
  user: string;
  database: string;
}

interface Options {
  messages: number;
  duration: number;
  rate: number;
  phases: string[];
  outageSeconds: number;
  pg: "local" | "throwaway";
  profile: boolean;
  inflight: number;
  keep: boolean;
  quietWait: number;
  memoryDetail: boolean;
  publisher: "raw" | "mqttjs";
}

/** What one run measured. */
interface RunResult {
  name: string;
  messages: number;
  /** Target rate of the publisher (0 = as fast as possible). */
  rate: number;
  seconds: number;
  messagesPerSecond: number;
  rowsPerSecond: number;
  rows: number;
  stored: number;
  lost: number;
  duplicated: number;
  partial: number;
  p50: number;
  p99: number;
  maxLatency: number;
  /** Publisher: time to publish everything, and its rate. */
  publishSeconds: number;
  peakRss: number | null;
  rss: Array<[number, number]>;
  cpu: Record<string, number>;
  notes: string[];
}

function parseOptions(): Options {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      messages: { type: "string", default: "100000" },
      duration: { type: "string", default: "0" },
      rate: { type: "string", default: "0" },
      phases: { type: "string", default: "broker,max,baseline,half" },
      outage: { type: "boolean", default: false },
      "outage-seconds": { type: "string", default: "10" },
      pg: { type: "string", default: "local" },
      profile: { type: "boolean", default: false },
      inflight: { type: "string", default: "0" },
      keep: { type: "boolean", default: false },
      "quiet-wait": { type: "string", default: "0" },
      "memory-detail": { type: "boolean", default: false },
      publisher: { type: "string", default: "raw" },
    },
  });
  const phases = values.phases.split(",").map((p) => p.trim()).filter(Boolean);
  if (values.outage && !phases.includes("outage")) phases.push("outage");
  for (const p of phases) {
    if (!["broker", "max", "baseline", "half", "outage"].includes(p)) {
      throw new Error(`unknown phase ${p}`);
    }
  }
  const num = (name: string, v: string) => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number >= 0`);
    return n;
  };
  if (values.pg !== "local" && values.pg !== "throwaway") {
    throw new Error("--pg must be local or throwaway");
  }
  return {
    messages: Math.floor(num("messages", values.messages)) || 100_000,
    duration: num("duration", values.duration),
    rate: num("rate", values.rate),
    phases,
    outageSeconds: num("outage-seconds", values["outage-seconds"]),
    pg: values.pg,
    profile: values.profile,
    inflight: Math.floor(num("inflight", values.inflight)),
    keep: values.keep,
    quietWait: num("quiet-wait", values["quiet-wait"]),
    memoryDetail: values["memory-detail"],
    publisher: values.publisher === "mqttjs" ? "mqttjs" : "raw",
  };
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const wallMs = () => performance.timeOrigin + performance.now();
const fmt = (n: number, digits = 0) =>
  n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
const say = (line: string) => console.log(line);

/** The start task's command line from deno.json, run against this checkout. */
function serviceArgs(profileDir: string | null): string[] {
  const config = JSON.parse(Deno.readTextFileSync(join(ROOT, "deno.json")));
  const words = String(config.tasks?.start ?? "").split(/\s+/).filter(Boolean);
  if (words[0] !== "deno" || words[1] !== "run" || words[words.length - 1] !== "main.ts") {
    throw new Error(`unexpected start task in deno.json: ${config.tasks?.start}`);
  }
  const flags = words.slice(2, -1);
  const extra = ["--config", join(ROOT, "deno.json")];
  if (profileDir) extra.push("--cpu-prof", `--cpu-prof-dir=${profileDir}`);
  // Diagnostics only, e.g. BENCH_SERVICE_FLAGS=--v8-flags=--trace-gc (the log has the output).
  extra.push(...(Deno.env.get("BENCH_SERVICE_FLAGS") ?? "").split(/\s+/).filter(Boolean));
  return ["run", ...extra, ...flags, join(ROOT, "main.ts")];
}

/** The environment a child needs to run Deno, and nothing of the service's settings. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" };
  for (const k of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]) {
    const v = Deno.env.get(k);
    if (v !== undefined) env[k] = v;
  }
  // Batch and spool settings may be varied from the bench's environment.
  for (const k of ["BATCH_MAX_MESSAGES", "BATCH_MAX_WAIT_MS", "SPOOL_SYNC_FULL"]) {
    const v = Deno.env.get(k);
    if (v !== undefined) env[k] = v;
  }
  return env;
}

/** Busy CPU seconds of the whole machine so far (all cores), from /proc/stat. */
function machineBusySeconds(): number {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0]!;
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - f[3]! - f[4]!) / 100;
}

function loadAverage(): string {
  return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
}

/** Share of all cores busy over `ms`, 0 to 1. */
async function machineBusy(ms: number): Promise<number> {
  const b0 = machineBusySeconds(), t0 = wallMs();
  await sleep(ms);
  return (machineBusySeconds() - b0) / ((wallMs() - t0) / 1000) / navigator.hardwareConcurrency;
}

/**
 * Other work on the machine skews every figure: says how busy it is, and
 * waits up to `seconds` for it to calm down (below 15% over 3 s).
 */
async function waitQuiet(seconds: number): Promise<void> {
  const until = wallMs() + seconds * 1000;
  let busy = await machineBusy(1000);
  while (busy > 0.15 && wallMs() < until) busy = await machineBusy(3000);
  say(`\n(before the run: machine ${fmt(busy * 100)}% busy, load average ${loadAverage()})`);
}

function machine(): string {
  const cpu = /model name\s*:\s*(.*)/.exec(Deno.readTextFileSync("/proc/cpuinfo"))?.[1] ?? "?";
  const memGb = Deno.systemMemoryInfo().total / 1024 ** 3;
  return `${navigator.hardwareConcurrency} cores (${cpu}), ${fmt(memGb, 1)} GB RAM, ` +
    `Linux ${Deno.osRelease()}, Deno ${Deno.version.deno}`;
}

/** Time of a commit with the WAL flush: the residual error of the latency figures. */
async function commitCost(sql: postgres.Sql, table: string): Promise<number> {
  await sql.unsafe(`CREATE TEMP TABLE ${table} (x int)`);
  const t0 = performance.now();
  for (let i = 0; i < 50; i++) {
    await sql.begin((tx) => tx.unsafe(`INSERT INTO ${table} VALUES (1)`));
  }
  const ms = (performance.now() - t0) / 50;
  await sql.unsafe(`DROP TABLE ${table}`);
  return ms;
}

class Bench {
  readonly id = crypto.randomUUID().slice(0, 8);
  readonly schema = `sif_bench_${this.id}`;
  readonly results: RunResult[] = [];
  tmp = "";
  mqttUrl = "";
  mosquittoPid = 0;

  constructor(readonly o: Options) {}

  table(name: string): string {
    return `"${this.schema}"."${name}"`;
  }

  async createTable(sql: postgres.Sql, name: string): Promise<void> {
    await sql.unsafe(`CREATE SCHEMA IF NOT EXISTS "${this.schema}"`);
    await sql.unsafe(createTableSql(this.table(name)));
  }

  /**
   * CPU seconds so far of the PostgreSQL backends serving process `client`
   * (found by its sockets' local ports) and of the cluster's background
   * processes (WAL writer, checkpointer...), not of other clients' backends.
   */
  async pgCpu(sql: postgres.Sql, client: number): Promise<Map<number, number>> {
    const ports = localTcpPorts(client);
    const rows = await sql.unsafe<{ pid: number }[]>(
      `SELECT pid FROM pg_stat_activity
        WHERE backend_type <> 'client backend' OR client_port = ANY($1::int[])`,
      [ports],
    );
    const m = new Map<number, number>();
    for (const { pid } of rows) m.set(pid, cpuSeconds(pid) ?? 0);
    return m;
  }

  /** CPU seconds of the last publisher, read when it reported "done" (before it exits). */
  publisherCpu = NaN;

  startPublisher(name: string, appId: string, topic: string, count: number, rate: number): Child {
    const opts = {
      url: this.mqttUrl,
      topic,
      appId,
      clientId: `sif-bench-pub-${this.id}-${name}`,
      first: 1,
      count,
      rate,
      window: 10_000,
      client: this.o.publisher,
    };
    this.publisherCpu = NaN;
    let pid = 0;
    const child = new Child(`publisher (${name})`, DENO, {
      args: [
        "run",
        "--config",
        join(ROOT, "deno.json"),
        "--allow-net",
        "--allow-env",
        "--allow-read",
        join(ROOT, "bench/publisher.ts"),
        JSON.stringify(opts),
      ],
      env: baseEnv(),
      cwd: this.tmp,
      logFile: join(this.tmp, `${name}-publisher.log`),
      onLine: (l) => {
        if (l.includes('"event":"done"')) this.publisherCpu = cpuSeconds(pid) ?? NaN;
      },
    });
    pid = child.pid;
    return child;
  }

  /**
   * One run through the service: fresh table, STATE_DIR and client id;
   * publishes `count` messages at `rate`, waits for the last commit.
   * `during` runs alongside (the outage), `sampleMs` sets the RSS sampling.
   */
  async runService(
    name: string,
    sql: postgres.Sql,
    db: Db,
    count: number,
    rate: number,
    sampleMs: number,
    during?: (service: Child) => Promise<void>,
  ): Promise<RunResult> {
    const appId = `e2e_${name}`;
    await this.createTable(sql, appId);
    const stateDir = join(this.tmp, `${name}-state`);
    const clientId = `sif-bench-${this.id}-${name}`;
    const topic = `ingest/stream/bench-${this.id}-${name}`;
    const profileDir = this.o.profile ? join(this.tmp, `${name}-profile`) : null;
    const env = {
      ...baseEnv(),
      ENV: "DEVELOPMENT",
      INGEST_STREAM: this.mqttUrl,
      MQTT_TOPIC: topic,
      MQTT_CLIENT_ID: clientId,
      TS_HOST: db.host,
      TS_PORT: String(db.port),
      TS_USER: db.user,
      TS_DATABASE: db.database,
      TS_SCHEMA: this.schema,
      STATE_DIR: stateDir,
      HTTP_PORT: "0",
      AUTO_CREATE_TABLES: "false",
      LOG_LEVEL: "info",
    };
    const service = new Child(`service (${name})`, DENO, {
      args: serviceArgs(profileDir),
      env,
      cwd: this.tmp,
      logFile: join(this.tmp, `${name}-service.log`),
    });
    const notes: string[] = [];
    try {
      await service.waitForLine((l) => l.includes('"msg":"subscribed"'), 60_000);
      const progressSql = `SELECT last_seq FROM "${this.schema}".sif_stream_progress
        WHERE client_id = '${clientId}'`;
      const cpu0 = this.cpuSnapshot(service.pid);
      const pg0 = await this.pgCpu(sql, service.pid);
      const publisher = this.startPublisher(name, appId, topic, count, rate);
      const published = publisher.waitForLine((l) => l.includes('"event":"done"'), 24 * 3600_000)
        .then((l) => JSON.parse(l) as { first_ms: number; last_ms: number; acked: number });
      published.catch(() => {});
      const extra = during?.(service);
      const rss: Array<[number, number]> = [];
      const t0 = wallMs();
      let nextSample = 0;
      let lastSeq = 0, lastChange = wallMs();
      let publisherDone = false;
      published.then(() => (publisherDone = true), () => (publisherDone = true));
      for (;;) {
        const now = wallMs();
        if (now >= nextSample) {
          const m = memory(service.pid);
          if (m) rss.push([(now - t0) / 1000, m.rss]);
          nextSample = now + sampleMs;
        }
        // (Bounded: during an outage the query waits for a connection.)
        const rows = await Promise.race([
          sql.unsafe<{ last_seq: string }[]>(progressSql).catch(() => []),
          sleep(1000).then(() => []),
        ]);
        const seq = Number(rows[0]?.last_seq ?? 0);
        if (seq !== lastSeq) (lastSeq = seq), (lastChange = now);
        if (seq >= count) break;
        if (!service.running) {
          notes.push("the service exited before the last commit");
          break;
        }
        if (publisherDone && now - lastChange > 60_000) {
          notes.push(`no progress for 60 s after publishing; committed through seq ${seq}`);
          break;
        }
        await sleep(250);
      }
      await extra;
      const peak = memory(service.pid)?.peak ?? null;
      if (this.o.memoryDetail) {
        const top = residentByMapping(service.pid).slice(0, 6);
        notes.push(
          "resident by mapping: " + top.map(([n, mb]) => `${n} ${fmt(mb, 1)} MB`).join(", "),
        );
      }
      const cpu = this.cpuDelta(cpu0, service.pid, publisher.pid);
      cpu.postgres = await this.pgDelta(sql, pg0, service.pid);
      const pub = await published.catch((e) => {
        notes.push(`publisher: ${(e as Error).message}`);
        return null;
      });
      const code = (await service.stop()).code;
      if (code !== 0) notes.push(`service exit code ${code}`);
      await publisher.stop(5000);
      const result = await this.stats(sql, name, appId, count, rate, pub, peak, rss, cpu, notes);
      if (profileDir) await this.printProfile(profileDir);
      await Deno.remove(stateDir, { recursive: true }).catch(() => {});
      return result;
    } finally {
      service.kill("SIGKILL");
    }
  }

  /** The naive consumer (`insert`), or one that only acknowledges (the broker's ceiling). */
  async runBaseline(sql: postgres.Sql, db: Db, count: number, insert = true): Promise<RunResult> {
    const name = insert ? "baseline" : "broker";
    const appId = name;
    await this.createTable(sql, appId);
    const topic = `ingest/stream/bench-${this.id}-${name}`;
    const opts = {
      url: this.mqttUrl,
      topic,
      clientId: `sif-bench-${this.id}-${name}`,
      db,
      table: this.table(appId),
      count,
      insert,
    };
    let processed = 0;
    // Read when it reports "done", before it exits.
    let atDone: { cpu: Record<string, number>; peak: number | null } | null = null;
    let pid = 0, cpu0: Record<string, number> = {};
    const consumer = new Child(name, DENO, {
      args: [
        "run",
        "--config",
        join(ROOT, "deno.json"),
        ...(Deno.env.get("BENCH_SERVICE_FLAGS") ?? "").split(/\s+/).filter(Boolean),
        "--allow-net",
        "--allow-env",
        "--allow-read",
        join(ROOT, "bench/baseline.ts"),
        JSON.stringify(opts),
      ],
      env: baseEnv(),
      cwd: this.tmp,
      logFile: join(this.tmp, `${name}-consumer.log`),
      onLine: (l) => {
        const m = /"processed":(\d+)/.exec(l);
        if (m) processed = Number(m[1]);
        if (l.includes('"event":"done"')) {
          atDone = { cpu: this.cpuDelta(cpu0, pid, 0), peak: memory(pid)?.peak ?? null };
        }
      },
    });
    pid = consumer.pid;
    const notes: string[] = [];
    try {
      await consumer.waitForLine((l) => l.includes('"event":"subscribed"'), 60_000);
      cpu0 = this.cpuSnapshot(consumer.pid);
      const pg0 = await this.pgCpu(sql, consumer.pid);
      const publisher = this.startPublisher(name, appId, topic, count, 0);
      const published = publisher.waitForLine((l) => l.includes('"event":"done"'), 24 * 3600_000)
        .then((l) => JSON.parse(l) as { first_ms: number; last_ms: number; acked: number });
      published.catch(() => {});
      const done = consumer.waitForLine((l) => l.includes('"event":"done"'), 24 * 3600_000);
      done.catch(() => {});
      let doneAt = NaN;
      done.then((l) => (doneAt = Number(JSON.parse(l).at_ms)), () => {});
      let last = -1, lastChange = wallMs(), finished = false;
      done.then(() => (finished = true), () => (finished = true));
      while (!finished) {
        if (processed !== last) (last = processed), (lastChange = wallMs());
        if (wallMs() - lastChange > 60_000) {
          notes.push(`no progress for 60 s; processed ${processed}`);
          break;
        }
        await sleep(250);
      }
      const end = atDone as { cpu: Record<string, number>; peak: number | null } | null;
      const peak = end?.peak ?? memory(consumer.pid)?.peak ?? null;
      const cpu = end?.cpu ?? this.cpuDelta(cpu0, consumer.pid, publisher.pid);
      // Its backend starts with the first message and ends with it: not measured.
      cpu.postgres = NaN;
      void pg0;
      const pub = await published.catch(() => null);
      cpu.publisher = this.publisherCpu;
      await consumer.stop(10_000);
      await publisher.stop(5000);
      if (insert) return await this.stats(sql, name, appId, count, 0, pub, peak, [], cpu, notes);
      // Nothing is stored: throughput from the first publish to the last message received.
      const seconds = (doneAt - (pub?.first_ms ?? NaN)) / 1000;
      return {
        name,
        messages: count,
        rate: 0,
        seconds,
        messagesPerSecond: count / seconds,
        rowsPerSecond: NaN,
        rows: 0,
        stored: finished ? count : processed,
        lost: finished ? 0 : count - processed,
        duplicated: 0,
        partial: 0,
        p50: NaN,
        p99: NaN,
        maxLatency: NaN,
        publishSeconds: pub ? (pub.last_ms - pub.first_ms) / 1000 : NaN,
        peakRss: peak,
        rss: [],
        cpu,
        notes,
      };
    } finally {
      consumer.kill("SIGKILL");
    }
  }

  cpuSnapshot(pid: number): Record<string, number> {
    return {
      service: cpuSeconds(pid) ?? 0,
      service_main_thread: cpuSeconds(pid, pid) ?? 0,
      mosquitto: cpuSeconds(this.mosquittoPid) ?? 0,
      machine: machineBusySeconds(),
      t: wallMs(),
    };
  }

  cpuDelta(c0: Record<string, number>, pid: number, publisherPid: number): Record<string, number> {
    const c1 = this.cpuSnapshot(pid);
    const publisher = Number.isNaN(this.publisherCpu)
      ? cpuSeconds(publisherPid) ?? NaN
      : this.publisherCpu;
    return {
      wall: (c1.t! - c0.t!) / 1000,
      service: c1.service! - c0.service!,
      service_main_thread: c1.service_main_thread! - c0.service_main_thread!,
      mosquitto: c1.mosquitto! - c0.mosquitto!,
      publisher,
      machine: c1.machine! - c0.machine!,
    };
  }

  /** CPU seconds used since `before` by the same processes (and backends started since). */
  async pgDelta(sql: postgres.Sql, before: Map<number, number>, client: number): Promise<number> {
    const after = await this.pgCpu(sql, client);
    let total = 0;
    for (const [pid, s] of after) total += s - (before.get(pid) ?? 0);
    for (const [pid, s] of before) if (!after.has(pid)) total += (cpuSeconds(pid) ?? s) - s;
    return total;
  }

  /** Reads the run's table: counts, throughput and latency (see the module doc). */
  async stats(
    sql: postgres.Sql,
    name: string,
    appId: string,
    count: number,
    rate: number,
    pub: { first_ms: number; last_ms: number } | null,
    peakRss: number | null,
    rss: Array<[number, number]>,
    cpu: Record<string, number>,
    notes: string[],
  ): Promise<RunResult> {
    const t = this.table(appId);
    const [s] = await sql.unsafe<Record<string, number | string | null>[]>(`
      WITH tx AS (
        SELECT xmin::text AS x, max(committed) AS done FROM ${t} GROUP BY 1
      ), msg AS (
        SELECT r.seq, min(r.time) AS sent, min(tx.done) AS done, count(*) AS n,
               count(DISTINCT tx.x) AS txs
          FROM ${t} r JOIN tx ON tx.x = r.xmin::text
         WHERE r.seq BETWEEN 1 AND ${count}
         GROUP BY r.seq
      )
      SELECT count(*)::int AS stored,
             coalesce(sum(n), 0)::int AS rows,
             count(*) FILTER (WHERE txs > 1 OR n > ${ROWS_PER_MESSAGE})::int AS duplicated,
             count(*) FILTER (WHERE n % ${ROWS_PER_MESSAGE} <> 0)::int AS partial,
             extract(epoch FROM max(done)) * 1000 AS last_commit_ms,
             percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM done - sent)) * 1000 AS p50,
             percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM done - sent)) * 1000 AS p99,
             extract(epoch FROM max(done - sent)) * 1000 AS max
        FROM msg`);
    const n = (k: string) => Number(s?.[k] ?? NaN);
    const first = pub?.first_ms ?? NaN;
    const seconds = (n("last_commit_ms") - first) / 1000;
    const stored = n("stored");
    return {
      name,
      messages: count,
      rate,
      seconds,
      messagesPerSecond: stored / seconds,
      rowsPerSecond: n("rows") / seconds,
      rows: n("rows"),
      stored,
      lost: count - stored,
      duplicated: n("duplicated"),
      partial: n("partial"),
      p50: n("p50"),
      p99: n("p99"),
      maxLatency: n("max"),
      publishSeconds: pub ? (pub.last_ms - pub.first_ms) / 1000 : NaN,
      peakRss,
      rss,
      cpu,
      notes,
    };
  }

  async printProfile(dir: string): Promise<void> {
    for await (const e of Deno.readDir(dir)) {
      if (!e.name.endsWith(".cpuprofile")) continue;
      say(`  CPU profile of the service (${join(dir, e.name)}), top self time:`);
      const top = topFunctions(JSON.parse(await Deno.readTextFile(join(dir, e.name))), 25);
      for (const f of top) say(`    ${fmt(f.percent, 1).padStart(5)}%  ${f.name}`);
    }
  }
}

function report(r: RunResult): void {
  say(`\n== ${r.name}: ${fmt(r.messages)} messages` + (r.rate ? ` at ${fmt(r.rate)}/s` : ""));
  say(
    `  ${fmt(r.messagesPerSecond)} messages/s, ${fmt(r.rowsPerSecond)} rows/s ` +
      `(first publish to last commit: ${fmt(r.seconds, 2)} s; publishing took ` +
      `${fmt(r.publishSeconds, 2)} s = ${fmt(r.messages / r.publishSeconds)}/s)`,
  );
  say(
    `  stored ${fmt(r.stored)} messages / ${fmt(r.rows)} rows; lost ${r.lost}, ` +
      `duplicated ${r.duplicated}, partial ${r.partial}`,
  );
  say(
    `  publish-to-commit latency: p50 ${fmt(r.p50, 1)} ms, p99 ${fmt(r.p99, 1)} ms, ` +
      `max ${fmt(r.maxLatency, 1)} ms`,
  );
  if (r.peakRss !== null) say(`  peak RSS (VmHWM) ${fmt(r.peakRss, 1)} MB`);
  const c = r.cpu;
  const pct = (v: number | undefined) =>
    Number.isNaN(v ?? NaN) ? "n/a" : `${fmt(100 * v! / c.wall!, 0)}%`;
  say(
    `  CPU over ${fmt(c.wall!, 1)} s (100% = one core): consumer ${pct(c.service)} ` +
      `(main thread ${pct(c.service_main_thread)}), postgres ${pct(c.postgres)}, ` +
      `mosquitto ${pct(c.mosquitto)}, publisher ${pct(c.publisher)}; whole machine ` +
      `${pct(c.machine)} of 200%, of which other processes` +
      `${Number.isNaN(c.postgres ?? NaN) ? " (postgres included)" : ""} ${
        pct(c.machine! - c.service! - (c.postgres || 0) - c.mosquitto! - (c.publisher || 0))
      }`,
  );
  if (r.rss.length > 0 && r.rss.length <= 3 * 60) printRss(r);
  for (const n of r.notes) say(`  NOTE: ${n}`);
}

async function main(): Promise<number> {
  const o = parseOptions();
  const bench = new Bench(o);
  bench.tmp = await Deno.makeTempDir({ prefix: "sif-bench-" });
  say(`machine: ${machine()}`);
  say(`work dir (logs): ${bench.tmp}`);

  const mosquitto = await startMosquitto({
    extraConfig: [
      `max_inflight_messages ${o.inflight}`,
      "max_queued_bytes 0",
      "max_queued_messages 0",
    ].join("\n"),
  });
  bench.mqttUrl = mosquitto.url;
  bench.mosquittoPid = pidsWithCommandLine(mosquitto.configFile)
    .find((p) => !Deno.readTextFileSync(`/proc/${p}/cmdline`).startsWith("/usr/bin/setpriv")) ??
    0;

  let pgInstance: PgInstance | null = null;
  const durablePg = "fsync = on\nsynchronous_commit = on\nfull_page_writes = on";
  let db: Db = { host: "127.0.0.1", port: 5432, user: "postgres", database: "postgres" };
  if (o.pg === "throwaway") {
    pgInstance = await startPostgres({ extraConfig: durablePg });
    db = { ...db, port: pgInstance.port };
  }
  const sql = postgres({ ...db, max: 2, onnotice: () => {} });
  let outagePg: PgInstance | null = null;
  let outageSql: postgres.Sql | null = null;
  let interrupted = false;
  const onSignal = () => (interrupted = true);
  Deno.addSignalListener("SIGINT", onSignal);
  try {
    const [row] = await sql.unsafe<{ version: string }[]>("SELECT version()");
    const version = row?.version ?? "?";
    say(
      `postgres: ${version.split(" ").slice(0, 2).join(" ")} at ${db.host}:${db.port}` +
        (o.pg === "throwaway" ? " (throwaway cluster, fsync on)" : ""),
    );
    say(`mosquitto: ${mosquitto.url}, max_inflight_messages ${o.inflight}, max_queued_messages 0`);
    const commit = await commitCost(sql, `commit_cost_${bench.id}`);
    say(`commit cost (BEGIN; INSERT; COMMIT, awaited): ${fmt(commit, 2)} ms`);

    let maxRate = o.rate;
    for (const phase of o.phases) {
      if (interrupted) break;
      let r: RunResult;
      await waitQuiet(o.quietWait);
      if (phase === "max") {
        say(`\n-- max: ${fmt(o.messages)} messages as fast as the publisher can send ...`);
        r = await bench.runService("max", sql, db, o.messages, 0, 1000);
        if (!o.rate) maxRate = r.messagesPerSecond;
      } else if (phase === "broker") {
        say(`\n-- broker: ${fmt(o.messages)} messages to a consumer that only acknowledges ...`);
        r = await bench.runBaseline(sql, db, o.messages, false);
      } else if (phase === "baseline") {
        say(`\n-- baseline: the naive consumer, ${fmt(o.messages)} messages ...`);
        r = await bench.runBaseline(sql, db, o.messages);
      } else if (phase === "half" || phase === "outage") {
        if (!maxRate) throw new Error(`the ${phase} run needs --rate or the max run first`);
        const rate = Math.round(maxRate / 2);
        const soak = phase === "half" && o.duration > 0;
        const count = soak ? Math.round(rate * o.duration) : o.messages;
        if (phase === "half") {
          say(
            `\n-- ${soak ? "soak" : "half"}: ${fmt(count)} messages at ${fmt(rate)}/s ` +
              `(half of ${fmt(maxRate)}/s) ...`,
          );
          r = await bench.runService(
            soak ? "soak" : "half",
            sql,
            db,
            count,
            rate,
            soak ? 5000 : 1000,
          );
        } else {
          outagePg = await startPostgres({ extraConfig: durablePg });
          const odb = { ...db, port: outagePg.port };
          outageSql = postgres({ ...odb, max: 2, onnotice: () => {} });
          const pg = outagePg;
          const stopAfter = (count / rate) * 250;
          say(
            `\n-- outage: ${fmt(count)} messages at ${fmt(rate)}/s on a throwaway PostgreSQL ` +
              `(${odb.port}), stopped after ${
                fmt(stopAfter / 1000, 1)
              } s for ${o.outageSeconds} s ...`,
          );
          const spoolSizes: Array<[number, number, number]> = [];
          r = await bench.runService("outage", outageSql, odb, count, rate, 1000, async (svc) => {
            const t0 = wallMs();
            const dir = join(bench.tmp, "outage-state");
            const sample = () => {
              let bytes = 0;
              for (const f of ["spool.sqlite", "spool.sqlite-wal"]) {
                try {
                  bytes += Deno.statSync(join(dir, f)).size;
                } catch { /* not yet */ }
              }
              spoolSizes.push([
                (wallMs() - t0) / 1000,
                bytes / 1024 ** 2,
                memory(svc.pid)?.rss ?? NaN,
              ]);
            };
            const sampler = setInterval(sample, 1000);
            await sleep(stopAfter);
            sample();
            await pg.stop();
            say(`   postgres stopped at ${fmt((wallMs() - t0) / 1000, 1)} s`);
            await sleep(o.outageSeconds * 1000);
            sample();
            await pg.start();
            say(`   postgres started at ${fmt((wallMs() - t0) / 1000, 1)} s`);
            // Sampling continues until the run is over (the writer retries with backoff).
            const stop = () => clearInterval(sampler);
            svc.status.then(stop);
            setTimeout(stop, 120_000);
          });
          say("   t(s)  spool on disk (MB)  service RSS (MB)");
          for (const [t, mb, rss] of spoolSizes) {
            say(
              `   ${fmt(t, 0).padStart(4)}  ${fmt(mb, 1).padStart(18)}  ${
                fmt(rss, 1).padStart(16)
              }`,
            );
          }
        }
      } else continue;
      bench.results.push(r);
      report(r);
      if (r.rss.length > 3 * 60) printRss(r);
    }
    const flags = Deno.env.get("BENCH_SERVICE_FLAGS");
    summary(
      bench.results,
      o,
      `Measured ${new Date().toISOString().slice(0, 10)} on ${machine()}; ` +
        `command: deno task bench ${Deno.args.join(" ")}` +
        (flags ? ` (BENCH_SERVICE_FLAGS=${flags})` : "") + `; publisher: ${o.publisher}.`,
    );
    return bench.results.every((r) => r.lost === 0 && r.notes.length === 0) ? 0 : 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    if (!o.keep) {
      await sql.unsafe(`DROP SCHEMA IF EXISTS "${bench.schema}" CASCADE`).catch(() => {});
    } else say(`kept schema ${bench.schema}`);
    await sql.end({ timeout: 5 });
    await outageSql?.end({ timeout: 5 });
    await outagePg?.destroy();
    await pgInstance?.destroy();
    await mosquitto.destroy();
  }
}

function printRss(r: RunResult): void {
  const xs = r.rss;
  const warm = xs.filter(([t]) => t >= 10);
  const use = warm.length >= 3 ? warm : xs;
  const n = use.length;
  const mt = use.reduce((a, [t]) => a + t, 0) / n;
  const mr = use.reduce((a, [, v]) => a + v, 0) / n;
  const slope = use.reduce((a, [t, v]) => a + (t - mt) * (v - mr), 0) /
    use.reduce((a, [t]) => a + (t - mt) ** 2, 0);
  say(
    `  RSS samples: ${xs.length}, min ${fmt(Math.min(...xs.map((x) => x[1])), 1)} MB, ` +
      `max ${fmt(Math.max(...xs.map((x) => x[1])), 1)} MB, trend after 10 s ` +
      `${fmt(slope * 60, 2)} MB/min`,
  );
  const step = Math.max(1, Math.ceil(xs.length / 20));
  say(
    "  RSS (s:MB) " +
      xs.filter((_, i) => i % step === 0 || i === xs.length - 1)
        .map(([t, v]) => `${fmt(t)}:${fmt(v)}`).join(" "),
  );
}

function summary(results: RunResult[], o: Options, header: string): void {
  const by = (n: string) => results.find((r) => r.name === n);
  const max = by("max"), base = by("baseline"), half = by("half") ?? by("soak");
  const pct = (r: RunResult, k: string) => {
    const v = r.cpu[k];
    return v === undefined || Number.isNaN(v) ? "-" : fmt((100 * v) / r.cpu.wall!);
  };
  const lines = [
    header,
    "",
    "| run | messages | msg/s | rows/s | lost | dup | p50 ms | p99 ms | peak RSS MB | " +
    "CPU %: service (main thread) / postgres / mosquitto / publisher |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ];
  for (const r of results) {
    const service = r.name === "baseline" || r.name === "broker" ? "consumer" : "service";
    lines.push(
      `| ${r.name}${r.rate ? ` (${fmt(r.rate)}/s)` : ""} | ${fmt(r.messages)} | ` +
        `${fmt(r.messagesPerSecond)} | ${
          Number.isNaN(r.rowsPerSecond) ? "-" : fmt(r.rowsPerSecond)
        } | ` +
        `${r.lost} | ${r.duplicated} | ${Number.isNaN(r.p50) ? "-" : fmt(r.p50, 1)} | ` +
        `${Number.isNaN(r.p99) ? "-" : fmt(r.p99, 1)} | ` +
        `${r.peakRss === null ? "-" : fmt(r.peakRss, 0)} | ${service} ${pct(r, "service")} ` +
        `(${pct(r, "service_main_thread")}) / ${pct(r, "postgres")} / ${pct(r, "mosquitto")} / ` +
        `${pct(r, "publisher")} |`,
    );
  }
  say("\n== summary (markdown)\n");
  for (const l of lines) say(l);
  say("");
  const check = (ok: boolean | undefined, text: string) =>
    say(`  [${ok === undefined ? "n/a" : ok ? "PASS" : "FAIL"}] ${text}`);
  check(
    max && max.messagesPerSecond >= 20_000 && max.lost === 0,
    `>= 20,000 messages/s with nothing lost: ${max ? fmt(max.messagesPerSecond) : "-"}`,
  );
  if (max && base) {
    const ratio = max.messagesPerSecond / base.messagesPerSecond;
    check(
      ratio >= 8,
      `>= 8x the naive baseline: ${fmt(ratio, 1)}x ` +
        `(${fmt(max.messagesPerSecond)} vs ${fmt(base.messagesPerSecond)} messages/s)`,
    );
  } else check(undefined, ">= 8x the naive baseline");
  check(
    half && half.p99 < 250,
    `p99 publish-to-commit < 250 ms at half rate: ` +
      `${half ? fmt(half.p99, 1) + " ms" : "-"}`,
  );
  const peaks = results.filter((r) => !["baseline", "broker"].includes(r.name) && r.peakRss);
  const peak = peaks.length ? Math.max(...peaks.map((r) => r.peakRss!)) : undefined;
  check(
    peak === undefined ? undefined : peak < 200,
    `peak RSS < 200 MB: ${peak ? fmt(peak, 1) : "-"} MB`,
  );
  if (max) {
    const mainUs = (1e6 * max.cpu.service_main_thread!) / max.messages;
    say(
      `  limiting stage (max run): the service's main thread was ` +
        `${pct(max, "service_main_thread")}% busy, ${fmt(mainUs, 1)} µs of CPU per message ` +
        `(MQTT intake, spool, parse/translate, serialization); postgres ` +
        `${fmt((1e6 * (max.cpu.postgres ?? NaN)) / max.rows, 2)} µs per row`,
    );
  }
  void o;
}

if (import.meta.main) {
  try {
    Deno.exit(await main());
  } catch (e) {
    console.error(`bench failed: ${e instanceof Error ? e.message : e}`);
    Deno.exit(1);
  }
}
