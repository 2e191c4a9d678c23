/**
 * Runs the real service in-process against the machine's Mosquitto (127.0.0.1:1883) and
 * PostgreSQL (127.0.0.1:5432) for integration tests, isolated per test:
 *  - a unique MQTT client id and topic prefix (`test/<id>/#`), so parallel tests and the real
 *    stream never meet; the broker session is removed again at the end;
 *  - a fresh temporary STATE_DIR (spool);
 *  - the dedicated database `sif_test` (created once), optionally a schema of the test's own;
 *  - app tables with unique names, dropped at the end.
 *
 * Everything returned here is `AsyncDisposable`: `await using svc = await startTestService()`.
 */

import { Buffer } from "node:buffer";
import mqtt from "mqtt";
import postgres from "postgres";
import { type Config, loadConfig } from "../../lib/config.ts";
import { type Level, setLogLevel } from "../../lib/log.ts";
import { type Service, type ServiceHooks, startService } from "../../lib/service.ts";
import { PROGRESS_TABLE } from "../../lib/writer.ts";

export const PG_HOST = "127.0.0.1";
export const PG_PORT = 5432;
export const PG_USER = "postgres";
export const BROKER_URL = "mqtt://127.0.0.1:1883";
/** The database the integration tests write to (never the machine's `postgres`). */
export const TEST_DATABASE = "sif_test";

/** Options for tests that hold npm sockets (postgres.js, mqtt.js). */
export const npmSockets = { sanitizeResources: false, sanitizeOps: false } as const;

export type Sql = postgres.Sql;

/** A short unique lower-case id, safe inside identifiers and topics. */
export function uid(): string {
  return crypto.randomUUID().replaceAll("-", "").slice(0, 16);
}

/** `"a""b"`: quotes an identifier for the test's own SQL. */
export function ident(name: string): string {
  return '"' + name.replaceAll('"', '""') + '"';
}

/** Creates `name` on the local server unless it exists (safe when raced). */
export async function ensureDatabase(name = TEST_DATABASE): Promise<void> {
  const sql = adminSql("postgres");
  try {
    const found = await sql`SELECT 1 FROM pg_database WHERE datname = ${name}`;
    if (found.length > 0) return;
    await sql.unsafe(`CREATE DATABASE ${ident(name)}`).catch((e) => {
      // 42P04 duplicate_database; 23505 when two creators race on pg_database.
      if (!(e instanceof postgres.PostgresError && ["42P04", "23505"].includes(e.code))) throw e;
    });
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** A postgres.js pool for the test's own queries; session time zone UTC. */
export function adminSql(database = TEST_DATABASE, max = 2): Sql {
  return postgres({
    host: PG_HOST,
    port: PG_PORT,
    user: PG_USER,
    database,
    max,
    connect_timeout: 10,
    onnotice: () => {},
    connection: { TimeZone: "UTC", application_name: "sif-test" },
  });
}

/** An admin pool that ends itself at the end of the scope. */
export function db(database = TEST_DATABASE): Sql & AsyncDisposable {
  const sql = adminSql(database) as Sql & AsyncDisposable;
  sql[Symbol.asyncDispose] = () => sql.end({ timeout: 5 });
  return sql;
}

/**
 * Polls `predicate` every `intervalMs` until it returns a truthy value (which is returned),
 * or throws after `timeoutMs` naming `what` and the last value seen.
 */
export async function waitFor<T>(
  predicate: () => T | Promise<T>,
  timeoutMs: number,
  what = "condition",
  intervalMs = 50,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  for (;;) {
    last = await predicate();
    if (last) return last as NonNullable<T>;
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${show(last)})`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

function show(v: unknown): string {
  try {
    return JSON.stringify(v)?.slice(0, 300) ?? String(v);
  } catch {
    return String(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Schemas and app tables
// ---------------------------------------------------------------------------------------------

/** A schema of the test's own (`TS_SCHEMA`), dropped with everything in it at the end. */
export async function createSchema(
  sql: Sql,
  prefix = "t",
): Promise<{ name: string } & AsyncDisposable> {
  const name = `${prefix}_${uid()}`;
  await sql.unsafe(`CREATE SCHEMA ${ident(name)}`);
  return {
    name,
    [Symbol.asyncDispose]: async () => {
      await sql.unsafe(`DROP SCHEMA IF EXISTS ${ident(name)} CASCADE`);
    },
  };
}

export interface AppTable extends AsyncDisposable {
  readonly schema: string;
  readonly name: string;
  /** `"schema"."name"` */
  readonly qualified: string;
  /** Extra columns (metadata / string metrics) in creation order. */
  readonly extra: readonly string[];
}

export interface AppTableOptions {
  schema?: string;
  /** Exact table name; default `app_<id>`. */
  name?: string;
  /** Extra SQL after the column list, e.g. a CHECK constraint. */
  constraints?: string;
}

/**
 * Creates an app table: `time timestamptz not null, metric varchar(128) not null,
 * value double precision not null`, plus `columns` (name → SQL type). Dropped at the end.
 */
export async function createAppTable(
  sql: Sql,
  columns: Record<string, string> = {},
  options: AppTableOptions = {},
): Promise<AppTable> {
  const schema = options.schema ?? "public";
  const name = options.name ?? `app_${uid()}`;
  const qualified = `${ident(schema)}.${ident(name)}`;
  const defs = [
    "time TIMESTAMPTZ NOT NULL",
    "metric VARCHAR(128) NOT NULL",
    "value DOUBLE PRECISION NOT NULL",
    ...Object.entries(columns).map(([c, type]) => `${ident(c)} ${type}`),
  ];
  if (options.constraints) defs.push(options.constraints);
  await sql.unsafe(`CREATE TABLE ${qualified} (${defs.join(", ")})`);
  return {
    schema,
    name,
    qualified,
    extra: Object.keys(columns),
    [Symbol.asyncDispose]: async () => {
      await sql.unsafe(`DROP TABLE IF EXISTS ${qualified}`);
    },
  };
}

/** A row read back: time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, extra columns by name. */
export type Row = Record<string, string | number | null>;

/** All rows of `table` with exact times, ordered by time, metric, value. */
export async function readRows(sql: Sql, table: AppTable, columns = table.extra): Promise<Row[]> {
  const cols = columns.map((c) => `, ${ident(c)}`).join("");
  const rows = await sql.unsafe(
    `SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS time,
            metric, value${cols}
       FROM ${table.qualified} ORDER BY time, metric COLLATE "C", value`,
  );
  return rows.map((r) => ({ ...r }) as Row);
}

/** Tuples of text sorted element by element, as `ORDER BY ... COLLATE "C"` sorts them. */
export function sortedTuples<T extends readonly string[]>(rows: readonly T[]): T[] {
  const cmp = (a: T, b: T): number => {
    for (let i = 0; i < Math.min(a.length, b.length); i++) {
      if (a[i] !== b[i]) return a[i]! < b[i]! ? -1 : 1;
    }
    return a.length - b.length;
  };
  return [...rows].sort(cmp);
}

/** Row count of a table. */
export async function countRows(sql: Sql, qualified: string): Promise<number> {
  const [r] = await sql.unsafe(`SELECT count(*)::int AS n FROM ${qualified}`);
  return r!.n as number;
}

/**
 * A fingerprint of every table in `schema` except `exclude`: name → row count and md5 of
 * the sorted row texts. Equal fingerprints before/after mean no other table changed.
 */
export async function fingerprint(
  sql: Sql,
  schema: string,
  exclude: readonly string[] = [],
): Promise<Record<string, string>> {
  const tables = await sql<{ name: string }[]>`
    SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${schema} AND c.relkind IN ('r', 'p') ORDER BY 1`;
  const out: Record<string, string> = {};
  for (const { name } of tables) {
    if (exclude.includes(name)) continue;
    const q = `${ident(schema)}.${ident(name)}`;
    const [r] = await sql.unsafe(
      `SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '')
         AS f FROM ${q} t`,
    );
    out[name] = r!.f as string;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Errors and dead letters
// ---------------------------------------------------------------------------------------------

export interface ErrorRow {
  app_id: string;
  error: string;
  device: string;
  timestamp: Date;
}

/** `"errorTable"` rows of one app id, ordered by error and device. */
export async function errorRows(
  sql: Sql,
  appId: string,
  schema = "public",
): Promise<ErrorRow[]> {
  const rows = await sql.unsafe<ErrorRow[]>(
    `SELECT app_id, error, device, "timestamp" FROM ${ident(schema)}."errorTable"
      WHERE app_id = $1 ORDER BY error COLLATE "C", device COLLATE "C"`,
    [appId],
  );
  return rows.map((r) => ({ ...r }));
}

export interface DeadLetter {
  id: string;
  topic: string;
  app_id: string;
  device: string;
  error: string;
  payload: Uint8Array;
  received_at: Date;
  source_seq: string;
}

/** The dead letters one test service wrote (by its unique source), oldest first. */
export async function deadLetters(
  sql: Sql,
  source: string,
  schema = "public",
): Promise<DeadLetter[]> {
  const rows = await sql.unsafe<DeadLetter[]>(
    `SELECT id, topic, app_id, device, error, payload, received_at, source_seq
       FROM ${ident(schema)}.sif_dead_letter WHERE source = $1 ORDER BY source_seq`,
    [source],
  );
  return rows.map((r) => ({ ...r, payload: new Uint8Array(r.payload) }));
}

// ---------------------------------------------------------------------------------------------
// MQTT publisher
// ---------------------------------------------------------------------------------------------

const encoder = new TextEncoder();

/** What can be published: an object is sent as its JSON text. */
export type Payload = string | Uint8Array | Record<string, unknown> | unknown[];

/** The exact bytes `payload` is published as. */
export function bytesOf(payload: Payload): Uint8Array {
  if (payload instanceof Uint8Array) return payload;
  if (typeof payload === "string") return encoder.encode(payload);
  return encoder.encode(JSON.stringify(payload));
}

/** A plain MQTT client that publishes at QoS 1 and waits for each PUBACK. */
export class Publisher implements AsyncDisposable {
  private constructor(readonly client: mqtt.MqttClient) {}

  static async connect(url = BROKER_URL): Promise<Publisher> {
    const client = await mqtt.connectAsync(url, {
      clientId: `sif-test-pub-${uid()}`,
      clean: true,
      reconnectPeriod: 0,
      connectTimeout: 10_000,
    });
    return new Publisher(client);
  }

  /** Publishes one message at QoS 1; resolves with the bytes sent once the broker has it. */
  async publish(topic: string, payload: Payload): Promise<Uint8Array> {
    const bytes = bytesOf(payload);
    await this.client.publishAsync(topic, Buffer.from(bytes), { qos: 1 });
    return bytes;
  }

  /** Publishes all, in order, pipelined; resolves once every one is acknowledged. */
  async publishAll(topic: string, payloads: readonly Payload[]): Promise<Uint8Array[]> {
    return await Promise.all(payloads.map((p) => this.publish(topic, p)));
  }

  async close(): Promise<void> {
    await this.client.endAsync().catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Removes a persistent session from the broker: connecting with a clean start and a
 * session expiry of 0 discards it, so test client ids do not pile up queues.
 */
export async function clearSession(clientId: string, url = BROKER_URL): Promise<void> {
  const client = await mqtt.connectAsync(url, {
    clientId,
    clean: true,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 10_000,
  });
  await client.endAsync();
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

export interface TestServiceOptions {
  /** Extra or overriding environment variables for loadConfig. */
  env?: Record<string, string>;
  /** Command-line arguments for loadConfig (e.g. a channel). */
  args?: string[];
  /** Default TEST_DATABASE. */
  database?: string;
  /** TS_SCHEMA; default public. */
  schema?: string;
  /** Shorter writer timings (see ServiceHooks). */
  writerTimings?: ServiceHooks["writerTimings"];
}

export interface BatchInfo {
  messages: number;
  rows: number;
  rejected: number;
}

export interface TestService extends AsyncDisposable {
  readonly id: string;
  readonly config: Config;
  readonly service: Service;
  /** `<client id>/<spool epoch>`: the `source` of this service's dead letters. */
  readonly source: string;
  /** A topic under the service's subscription (`test/<id>/<suffix>`). */
  topic(suffix?: string): string;
  /** Messages handed to the service by the broker (redeliveries count again). */
  readonly received: number;
  /** Every batch the writer finished. */
  readonly batches: readonly BatchInfo[];
  /** Publishes to `topic()` at QoS 1; returns the bytes sent. */
  publish(payload: Payload, topic?: string): Promise<Uint8Array>;
  publishAll(payloads: readonly Payload[], topic?: string): Promise<Uint8Array[]>;
  /** Waits until `n` messages were received and the spool is empty (all committed). */
  idle(n: number, timeoutMs?: number): Promise<void>;
  /** The service's stop(); later calls return the first result. */
  stop(deadlineMs?: number): Promise<{ drained: boolean; pending: number }>;
}

/** Log level for services under test: quiet unless SIF_TEST_LOG_LEVEL says otherwise. */
const TEST_LOG_LEVEL = (Deno.env.get("SIF_TEST_LOG_LEVEL") ?? "error") as Level;

/** The environment a test service is configured from (before `options.env`). */
export function testEnv(id: string, stateDir: string, options: TestServiceOptions = {}) {
  return {
    ENV: "DEVELOPMENT",
    INGEST_STREAM: "127.0.0.1:1883",
    MQTT_CLIENT_ID: `sif-test-${id}`,
    MQTT_TOPIC: `test/${id}/#`,
    STATE_DIR: stateDir,
    TS_HOST: PG_HOST,
    TS_PORT: String(PG_PORT),
    TS_USER: PG_USER,
    TS_DATABASE: options.database ?? TEST_DATABASE,
    TS_SCHEMA: options.schema ?? "public",
    BATCH_MAX_WAIT_MS: "5",
    HTTP_PORT: "0",
    AUTO_CREATE_TABLES: "false",
    LOG_LEVEL: TEST_LOG_LEVEL,
    ...options.env,
  };
}

/**
 * Starts the service in-process and resolves once its subscription is acknowledged (so
 * nothing published afterwards can be missed) and its writer has set up the database.
 * Dispose it to stop it, delete its spool,
 * its progress row and its broker session.
 */
export async function startTestService(options: TestServiceOptions = {}): Promise<TestService> {
  const database = options.database ?? TEST_DATABASE;
  if (database === TEST_DATABASE) await ensureDatabase();
  const id = uid();
  const stateDir = await Deno.makeTempDir({ prefix: "sif-test-" });
  const config = loadConfig(testEnv(id, stateDir, options), options.args ?? []);
  setLogLevel(config.logLevel);
  let received = 0;
  const batches: BatchInfo[] = [];
  const service = startService(config, {
    mqtt: { received: () => void received++ },
    writer: { batch: ({ messages, rows, rejected }) => batches.push({ messages, rows, rejected }) },
    writerTimings: options.writerTimings,
  });
  const source = `${config.mqtt.clientId}/${service.spool.epoch}`;
  let publisher: Publisher | null = null;
  let stopping: Promise<{ drained: boolean; pending: number }> | null = null;
  const stop = (deadlineMs?: number) => stopping ??= service.stop(deadlineMs);
  const cleanup = async () => {
    await stop().catch(() => {});
    await publisher?.close();
    await clearSession(config.mqtt.clientId).catch(() => {});
    await Deno.remove(stateDir, { recursive: true }).catch(() => {});
    // What this service wrote to the shared tables: its progress row, its dead letters
    // and the "errorTable" rows of the (unique) app ids it dead-lettered.
    const sql = adminSql(config.db.database, 1);
    const schema = ident(config.schema);
    try {
      await sql.unsafe(`DELETE FROM ${schema}.${ident(PROGRESS_TABLE)} WHERE client_id = $1`, [
        config.mqtt.clientId,
      ]).catch(() => {});
      await sql.unsafe(
        `DELETE FROM ${schema}."errorTable" WHERE app_id IN
           (SELECT app_id FROM ${schema}.sif_dead_letter WHERE source = $1)`,
        [source],
      ).catch(() => {});
      await sql.unsafe(`DELETE FROM ${schema}.sif_dead_letter WHERE source = $1`, [source])
        .catch(() => {});
    } finally {
      await sql.end({ timeout: 5 });
    }
  };

  // Subscribed = SUBACK received; a fatal reason (refused subscription) fails fast.
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no SUBACK within 10 s")), 10_000);
      service.client.on("packetreceive", (packet) => {
        if (packet.cmd === "suback") {
          clearTimeout(timer);
          resolve();
        }
      });
      service.fatal.then((reason) => {
        clearTimeout(timer);
        reject(new Error(reason));
      });
    });
    publisher = await Publisher.connect();
    // The writer has created its tables ("errorTable", dead letters, progress).
    await waitFor(() => service.writer.databaseOk, 15_000, "the writer's database set-up");
  } catch (e) {
    await cleanup();
    throw e;
  }
  const pub = publisher;
  const topic = (suffix = "0") => `test/${id}/${suffix}`;
  return {
    id,
    config,
    service,
    source,
    topic,
    get received() {
      return received;
    },
    batches,
    publish: (payload, t = topic()) => pub.publish(t, payload),
    publishAll: (payloads, t = topic()) => pub.publishAll(t, payloads),
    idle: async (n, timeoutMs = 15_000) => {
      await waitFor(
        () => received >= n && service.spool.count === 0,
        timeoutMs,
        `${n} messages received and written`,
      );
    },
    stop,
    [Symbol.asyncDispose]: cleanup,
  };
}

/** Epoch seconds of an ISO time, for building messages. */
export function seconds(iso: string): number {
  return Date.parse(iso) / 1000;
}
