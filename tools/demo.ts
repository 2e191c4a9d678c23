/**
 * `deno task demo`: publishes a short, realistic IR stream (three apps, a few
 * devices, numbers, booleans, strings, one deliberately bad message) to the
 * broker the service is configured with, waits until the service has written
 * it, and prints what landed in each table and in "errorTable".
 *
 * Settings are read exactly as the service reads them (environment, then
 * `.env`), so with nothing configured it talks to the development defaults:
 * the local or embedded broker and database the service is using.
 */

import { Buffer } from "node:buffer";
import mqtt from "mqtt";
import { type Config, ConfigError, loadConfig, mergedEnv, readEnvFile } from "../lib/config.ts";
import { connect, describe, type Sql } from "../lib/db.ts";
import { qualified, quoteIdent } from "../lib/ident.ts";

/** One message of the demo stream. */
export interface DemoMessage {
  readonly topic: string;
  readonly body: Record<string, unknown>;
  /** Rows it should produce (0 for the bad one). */
  readonly rows: number;
}

/** The demo's app tables. */
export const DEMO_APPS = ["demo_weather", "demo_power", "demo_garden"] as const;
/** The error the bad message is stored with (SPEC section 4). */
export const DEMO_ERROR = "unexpected object (expected primitive)";

/**
 * The demo stream for a run starting at `now` (ms): times are the last
 * minute, topics alternate between channels 0 and 1 like the ingest-broker's.
 */
export function demoMessages(now: number, topicFilter: string): DemoMessage[] {
  const topic = topicsFor(topicFilter);
  const at = (secondsAgo: number) => Math.round(now - secondsAgo * 1000) / 1000;
  const out: DemoMessage[] = [];
  const add = (body: Record<string, unknown>, rows: number) =>
    out.push({ topic: topic(out.length), body, rows });
  const stations = [["station-1", "roof", 3], ["station-2", "yard", 0]] as const;
  for (let i = 0; i < 3; i++) {
    for (const [device, site, floor] of stations) {
      add({
        app_id: "demo_weather",
        data: {
          time: at(50 - i * 20) + (floor ? 0.25 : 0),
          device,
          metadata: { site, floor },
          payload: {
            temperature: Math.round((18 + i + floor * 0.7) * 10) / 10,
            humidity: 40 + i * 3 - floor,
            status: i === 2 && device === "station-2" ? "low battery" : "ok",
          },
        },
      }, 3);
    }
  }
  // Several readings in one message (data is an array), with a boolean metric.
  for (const meter of ["meter-A", "meter-B"]) {
    add({
      app_id: "demo_power",
      data: [0, 1, 2].map((k) => ({
        time: at(45 - k * 15),
        device: meter,
        metadata: { building: meter === "meter-A" ? "north" : "south" },
        payload: {
          kw: Math.round((2.5 + k * 0.4 + (meter === "meter-B" ? 1 : 0)) * 100) / 100,
          on: k !== 1,
        },
      })),
    }, 6);
  }
  // Older clients send ISO time strings; a null metric produces no row.
  add({
    app_id: "demo_garden",
    data: {
      time: new Date(now - 30_000).toISOString(),
      device: "soil-3",
      metadata: { bed: "tomatoes" },
      payload: { moisture: 0.31, ph: 6.4, pump: false, battery: null },
    },
  }, 3);
  // The deliberately bad one: an object where a number belongs.
  add({
    app_id: "demo_weather",
    data: {
      time: at(5),
      device: "station-9",
      metadata: { site: "shed", floor: 0 },
      payload: { temperature: { celsius: 21 } },
    },
  }, 0);
  return out;
}

/** Topics under the service's subscription: channels 0 and 1 of `ingest/stream/#`. */
function topicsFor(filter: string): (i: number) => string {
  const plain = filter.replace(/^\$share\/[^/]+\//, "");
  if (plain.endsWith("/#")) return (i) => `${plain.slice(0, -2)}/${i % 2}`;
  if (plain === "#") return (i) => `ingest/stream/${i % 2}`;
  return () => plain.replaceAll("+", "0");
}

/** A row as printed. */
export type Row = Record<string, unknown>;

export interface DemoResult {
  /** Rows of this run per table, oldest first. */
  readonly tables: Record<string, Row[]>;
  /** "errorTable" rows refreshed during this run. */
  readonly errors: Row[];
  /** True when every expected row and the expected error arrived in time. */
  readonly complete: boolean;
}

/** Publishes the stream, waits up to `timeoutMs` for the service, reads back. */
export async function runDemo(
  config: Config,
  print: (line: string) => void = console.log,
  timeoutMs = 20_000,
): Promise<DemoResult> {
  const started = Date.now();
  const messages = demoMessages(started, config.mqtt.topic);
  const client = await mqtt.connectAsync(config.mqtt.url, {
    clientId: `sif-demo-${crypto.randomUUID().slice(0, 8)}`,
    clean: true,
    protocolVersion: 4, // both Mosquitto and the embedded broker speak 3.1.1
    reconnectPeriod: 0,
    connectTimeout: 10_000,
    username: config.mqtt.username,
    password: config.mqtt.password,
    ca: config.mqtt.ca ? [config.mqtt.ca] : undefined,
    cert: config.mqtt.cert,
    key: config.mqtt.key,
  });
  try {
    for (const m of messages) {
      await client.publishAsync(m.topic, Buffer.from(JSON.stringify(m.body)), { qos: 1 });
    }
  } finally {
    await client.endAsync();
  }
  const expected = new Map<string, number>();
  for (const m of messages) {
    const app = m.body.app_id as string;
    expected.set(app, (expected.get(app) ?? 0) + m.rows);
  }
  print(
    `Published ${messages.length} messages (${messages.length - 1} good, 1 deliberately bad) ` +
      `to ${config.mqtt.url}, topics ${[...new Set(messages.map((m) => m.topic))].join(", ")}.`,
  );
  print(`Waiting for the service to write them to ${describe(config.db)} ...`);

  const sql = connect(config.db, 1);
  const errorsSql = config.errorsDb.database === config.db.database
    ? sql
    : connect(config.errorsDb, 1);
  try {
    // This run's rows: exactly the times it sent (earlier runs used other milliseconds).
    const times = [...new Set(messages.flatMap((m) => sentTimes(m.body)))];
    const read = async (): Promise<DemoResult> => {
      const tables: Record<string, Row[]> = {};
      let complete = true;
      for (const app of DEMO_APPS) {
        tables[app] = await rowsOf(sql, config.schema, app, times);
        if (tables[app].length < expected.get(app)!) complete = false;
      }
      const errors = await errorsSince(errorsSql, config.schema, new Date(started));
      if (!errors.some((e) => e.error === DEMO_ERROR)) complete = false;
      return { tables, errors, complete };
    };
    let result = await read();
    while (!result.complete && Date.now() - started < timeoutMs) {
      await new Promise((r) => setTimeout(r, 250));
      result = await read();
    }
    for (const app of DEMO_APPS) {
      const rows = result.tables[app]!;
      print("");
      print(
        `${config.schema}.${app}: ${rows.length} rows from this run (expected ${
          expected.get(app)
        })`,
      );
      print(
        rows.length > 0
          ? formatTable(rows)
          : "  (none: is the service running? is AUTO_CREATE_TABLES on?)",
      );
    }
    print("");
    print(`${config.schema}."errorTable" (refreshed by this run):`);
    print(result.errors.length > 0 ? formatTable(result.errors) : "  (none)");
    print("");
    print(
      result.complete
        ? `Everything arrived in ${((Date.now() - started) / 1000).toFixed(1)} s.`
        : `Not everything arrived within ${timeoutMs / 1000} s: see the service's log.`,
    );
    print(
      `The demo tables (${DEMO_APPS.join(", ")}) are only for this demo; to remove them: ` +
        `DROP TABLE ${DEMO_APPS.map((t) => `${config.schema}.${t}`).join(", ")};`,
    );
    return result;
  } finally {
    await sql.end({ timeout: 5 });
    if (errorsSql !== sql) await errorsSql.end({ timeout: 5 });
  }
}

/** The times of a message's readings, as ISO text. */
function sentTimes(body: Record<string, unknown>): string[] {
  const data = Array.isArray(body.data) ? body.data : [body.data];
  return data.map((d: { time: number | string }) =>
    typeof d.time === "number" ? new Date(d.time * 1000).toISOString() : d.time
  );
}

async function rowsOf(sql: Sql, schema: string, table: string, times: string[]): Promise<Row[]> {
  const columns = await sql.unsafe<{ name: string }[]>(
    `SELECT a.attname AS name FROM pg_catalog.pg_attribute a
       JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
      ORDER BY a.attnum`,
    [schema, table],
  );
  if (columns.length === 0) return []; // not created (yet)
  const extra = columns.map((c) => c.name).filter((n) => !["time", "metric", "value"].includes(n))
    .map((n) => `, t.${quoteIdent(n)}`).join("");
  const rows = await sql.unsafe(
    `SELECT pg_catalog.to_char(t.time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') AS time,
            t.metric, t.value${extra}
       FROM ${qualified(schema, table)} t
      WHERE t.time = ANY($1::timestamptz[]) ORDER BY t.time, t.metric`,
    [times] as never[],
  );
  return rows.map((r) => ({ ...r }));
}

async function errorsSince(sql: Sql, schema: string, since: Date): Promise<Row[]> {
  const [found] = await sql.unsafe(
    `SELECT pg_catalog.to_regclass($1) IS NOT NULL AS found`,
    [qualified(schema, "errorTable")],
  );
  if (!found?.found) return [];
  const rows = await sql.unsafe(
    `SELECT app_id, device, error FROM ${qualified(schema, "errorTable")}
      WHERE "timestamp" >= $1::timestamptz ORDER BY app_id, device, error`,
    [since.toISOString()],
  );
  return rows.map((r) => ({ ...r }));
}

/** Rows as an aligned text table. */
export function formatTable(rows: readonly Row[]): string {
  const columns = Object.keys(rows[0] ?? {});
  const cell = (v: unknown) => (v === null || v === undefined ? "" : String(v));
  const widths = columns.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (values: string[]) =>
    "  " + values.map((v, i) => v.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(columns), ...rows.map((r) => line(columns.map((c) => cell(r[c]))))].join("\n");
}

if (import.meta.main) {
  let config: Config;
  try {
    const file = readEnvFile();
    config = loadConfig(mergedEnv(file.vars), [], file.path);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    for (const p of e.problems) console.error(`configuration: ${p}`);
    Deno.exit(2);
  }
  try {
    const result = await runDemo(config);
    Deno.exit(result.complete ? 0 : 1);
  } catch (e) {
    console.error(`demo failed: ${(e as Error).message}`);
    console.error("Is the service running (deno task start)? It starts the broker in development.");
    Deno.exit(1);
  }
}
