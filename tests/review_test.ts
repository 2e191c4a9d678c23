/**
 * Bugs found by an adversarial review, each pinned to the behaviour the contract (SPEC.md)
 * asks for (every one of these failed before its fix), plus a regression test for a path
 * the other suites do not cover. Each test runs the service in a schema of its own.
 */

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import mqtt from "mqtt";
import { MAX_PREPARED_INSERTS } from "../lib/writer.ts";
import {
  BROKER_URL,
  createAppTable,
  createSchema,
  db,
  deadLetters,
  ensureDatabase,
  ident,
  npmSockets,
  readRows,
  type Sql,
  startTestService,
  type TestService,
  uid,
  waitFor,
} from "./helpers/service.ts";

const T0 = 1700000000.25;

/** Every "errorTable" row of the schema as [app_id, error, device], sorted. */
async function allErrors(sql: Sql, schema: string): Promise<string[][]> {
  const rows = await sql.unsafe(
    `SELECT app_id, error, device FROM ${ident(schema)}."errorTable"
      ORDER BY app_id COLLATE "C", error COLLATE "C", device COLLATE "C"`,
  );
  return rows.map((r) => [r.app_id, r.error, r.device]);
}

function msg(app: string, extra: Record<string, unknown> = {}, device = "probe") {
  return { app_id: app, data: { time: T0, device, payload: { x: 1 }, ...extra } };
}

interface Setup extends AsyncDisposable {
  sql: Sql;
  schema: string;
  svc: TestService;
}

async function setup(): Promise<Setup> {
  await ensureDatabase();
  const sql = db();
  const schema = await createSchema(sql, "probe");
  const svc = await startTestService({ schema: schema.name });
  return {
    sql,
    schema: schema.name,
    svc,
    [Symbol.asyncDispose]: async () => {
      await svc[Symbol.asyncDispose]();
      await schema[Symbol.asyncDispose]();
      await sql[Symbol.asyncDispose]();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Bug 1 (fixed): retained messages are stored again on every reconnect (duplicate rows).
//
// lib/mqtt.ts subscribes again on every "connect" with `{ qos: 1 }` only, i.e. MQTT 5
// Retain Handling 0 ("send retained messages at the time of the subscribe"; MQTT 3.1.1
// 3.3.1.3 says the same for a repeated SUBSCRIBE). A retained IR message on the stream
// topic is therefore delivered, spooled and inserted once more after every broker
// reconnect (and every restart), without limit. Nothing in lib/ looks at the retain flag.
// SPEC section 5 allows duplicates only from lost acknowledgements; the README bounds them
// to the in-flight window per event. Fix: subscribe with `rh: 1` (retained only for a new
// subscription) or `rh: 2`, or drop deliveries with packet.retain set after the first.
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "review: a retained IR message is written once, not again after a broker reconnect",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    await using table = await createAppTable(sql, {}, { schema });
    const topic = svc.topic("retained");
    const pub = await mqtt.connectAsync(BROKER_URL, {
      clientId: `sif-probe-pub-${uid()}`,
      clean: true,
      reconnectPeriod: 0,
    });
    try {
      await pub.publishAsync(topic, Buffer.from(JSON.stringify(msg(table.name))), {
        qos: 1,
        retain: true,
      });
      await svc.idle(1);
      assert.equal((await readRows(sql, table)).length, 1);

      // A network blip: the broker connection breaks, mqtt.js reconnects and resubscribes.
      const client = svc.service.client;
      client.stream.destroy();
      await waitFor(() => !client.connected, 5_000, "disconnect");
      await waitFor(() => client.connected, 15_000, "reconnect");
      await new Promise((r) => setTimeout(r, 1_500)); // the SUBACK and any retained delivery
      await waitFor(() => svc.service.spool.count === 0, 10_000, "spool drained");

      assert.equal((await readRows(sql, table)).length, 1, "the reading was stored twice");
      assert.equal(svc.received, 1, "the retained message was delivered again");
    } finally {
      // Clear the retained message (a 0-byte retained PUBLISH) so it does not linger.
      await pub.publishAsync(topic, Buffer.alloc(0), { qos: 1, retain: true }).catch(() => {});
      await pub.endAsync().catch(() => {});
    }
  },
});

// ---------------------------------------------------------------------------------------------
// Bug 2 (fixed): a column whose type changed from number to text keeps rejecting valid messages.
//
// lib/schema.ts caches a table's columns for the life of the process and only re-reads
// them when a message names an unknown column (translate's `missingColumn`). A type
// mismatch found against the cache is trusted as is: after
// `ALTER COLUMN floor TYPE VARCHAR(128)` every message with `"floor": "3a"` is rejected with
// `unexpected string (expected number)` until the service restarts, although the table
// accepts it. (The reverse change, text -> number, is handled: the INSERT fails and the
// writer invalidates the cache — tests/hostile_db_test.ts.) A type error against a cache
// entry read before the message arrived should be checked against a fresh read, as an
// unknown column is (lib/writer.ts #prepare, lib/translate.ts cellFor).
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "review: a column changed from DOUBLE PRECISION to VARCHAR is used with its new type",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    await using table = await createAppTable(sql, { floor: "DOUBLE PRECISION" }, { schema });
    await svc.publish(msg(table.name, { metadata: { floor: 3 } }, "number"));
    await svc.idle(1); // the cache now says floor is a number
    await sql.unsafe(`ALTER TABLE ${table.qualified} ALTER COLUMN floor TYPE VARCHAR(128)`);
    await svc.publish(msg(table.name, { metadata: { floor: "3a" } }, "text-after-alter"));
    await svc.idle(2);
    assert.deepEqual(await allErrors(sql, schema), []);
    assert.deepEqual((await readRows(sql, table)).map((r) => r.floor), ["3", "3a"]);
  },
});

// ---------------------------------------------------------------------------------------------
// Bug 3 (fixed): a table once seen as "not an app table" is "invalid app" for the life of the process.
//
// lib/schema.ts `get()` reuses any cached entry whose info is not null, and
// lib/translate.ts `translate()` answers `invalid app` for a table without time/metric/value
// with `missingColumn: false`, so the entry is never read again. When the table is then
// fixed (the missing core column added, or the table dropped and created again as an app
// table), every message for that app is dead-lettered as `invalid app` until a restart.
// A missing *table* is re-read when the message is newer than the cache entry; a table that
// is not (yet) an app table should be treated the same way.
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "review: a table that became an app table after a message said 'invalid app' is written",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    const name = `half_${uid()}`;
    const qualified = `${ident(schema)}.${ident(name)}`;
    // Created in steps: the "value" column comes last.
    await sql.unsafe(`CREATE TABLE ${qualified} (time TIMESTAMPTZ NOT NULL,
      metric VARCHAR(128) NOT NULL)`);
    await svc.publish(msg(name, {}, "before"));
    await svc.idle(1);
    assert.deepEqual(await allErrors(sql, schema), [[name, "invalid app", "before"]]);

    await sql.unsafe(`ALTER TABLE ${qualified} ADD COLUMN value DOUBLE PRECISION NOT NULL`);
    await svc.publish(msg(name, {}, "after"));
    await svc.idle(2);
    assert.deepEqual(await allErrors(sql, schema), [[name, "invalid app", "before"]]);
    const [r] = await sql.unsafe(`SELECT count(*)::int AS n FROM ${qualified}`);
    assert.equal(r!.n, 1);
  },
});

// ---------------------------------------------------------------------------------------------
// Bug 4 (fixed): one server-side prepared statement per distinct column set, never released.
//
// lib/writer.ts sends every INSERT with `{ prepare: true }`, and the SQL text depends on
// the table and on the set of metadata/string-metric columns a message uses
// (lib/translate.ts buildInsert). postgres.js 3.4.9 keeps every named statement of a
// connection in a plain object with no limit (src/connection.js `statements`), and so does
// the PostgreSQL backend, until the connection is recycled (max_lifetime 1 h, lib/db.ts).
// A sender whose table has n nullable columns can make 2^n distinct statements (60 columns:
// 10^18), and every message can use a new one: memory grows without bound in the service
// and in PostgreSQL, at the sender's rate, for an hour. Expected: a bounded cache of
// prepared statements (LRU + DEALLOCATE), or unnamed statements for shapes not seen before.
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "review: distinct column sets do not pile up prepared statements without bound",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    const COLS = 12;
    const columns = Object.fromEntries(
      Array.from({ length: COLS }, (_, i) => [`k${i}`, "DOUBLE PRECISION"]),
    );
    await using table = await createAppTable(sql, columns, { schema });
    const N = 1500; // distinct non-empty subsets of 12 columns: 4095
    const messages = Array.from({ length: N }, (_, i) => {
      const mask = i + 1;
      const metadata: Record<string, number> = {};
      for (let b = 0; b < COLS; b++) if (mask & (1 << b)) metadata[`k${b}`] = b;
      return msg(table.name, { time: T0 + i, metadata }, `m${i}`);
    });
    // In slices, so batches are small and many statements are prepared.
    for (let i = 0; i < N; i += 100) {
      await svc.publishAll(messages.slice(i, i + 100));
      await svc.idle(Math.min(N, i + 100), 60_000);
    }
    assert.deepEqual(await allErrors(sql, schema), []);
    const [c] = await sql.unsafe(`SELECT count(*)::int AS n FROM ${table.qualified}`);
    assert.equal(c!.n, N);

    // Prepared statements held by the service's connections (its pool has at most 2).
    const svcSql = svc.service.sql;
    const held = [await svcSql.reserve(), await svcSql.reserve()];
    let prepared = 0;
    try {
      for (const conn of held) {
        const [r] = await conn.unsafe(
          `SELECT count(*)::int AS n FROM pg_catalog.pg_prepared_statements`,
        );
        prepared += r!.n as number;
      }
    } finally {
      for (const conn of held) conn.release();
    }
    assert.ok(
      prepared <= 2 * MAX_PREPARED_INSERTS + 20,
      `${prepared} prepared statements held for ${N} messages`,
    );
  },
});

// ---------------------------------------------------------------------------------------------
// Bug 5 (fixed): a rejection that cannot be recorded stops the writer for good (hang).
//
// SPEC section 4 says "errorTable" is created only when missing, so an existing one (the
// old platform's) is used as it is. lib/rejects.ts truncates app_id and device to 128
// characters, assuming the service's own column sizes. When the existing table is narrower
// (here device VARCHAR(32)) a sender's long device makes the upsert fail with 22001; in
// lib/writer.ts #commitOrSplit a failing rejection is rethrown (`if (!one.ok) throw e`) and
// #retrying retries the same batch forever: nothing after that message is ever written,
// the spool fills and the service stops acknowledging. Any permanent error while recording
// a rejection (a CHECK, a trigger, a column size) has the same effect. Expected: the
// message still reaches sif_dead_letter (or the rejection is recorded in a form that fits)
// and later messages are written.
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: 'review: a rejection that does not fit an existing "errorTable" does not stop the writer',
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "probe");
    await sql.unsafe(`CREATE TABLE ${ident(schema.name)}."errorTable" (
      app_id VARCHAR(128) NOT NULL, error TEXT NOT NULL, device VARCHAR(32) NOT NULL DEFAULT '',
      "timestamp" TIMESTAMPTZ NOT NULL DEFAULT now(),
      CONSTRAINT unique_error_src UNIQUE (app_id, error, device))`);
    await using svc = await startTestService({ schema: schema.name });
    await using table = await createAppTable(sql, {}, { schema: schema.name });
    await svc.publish(msg(`missing_${uid()}`, {}, "d".repeat(40)));
    await svc.publish(msg(table.name, {}, "ok"));
    await waitFor(
      async () => (await readRows(sql, table)).length === 1,
      15_000,
      "the message after the rejected one to be written",
    );
    const letters = await deadLetters(sql, svc.source, schema.name);
    assert.deepEqual(letters.map((d) => d.error), ["invalid app"]);
  },
});

// ---------------------------------------------------------------------------------------------
// Regression (passes): a 0-byte MQTT payload goes through the SQLite spool (an empty BLOB
// in a NOT NULL column) and is dead-lettered as "invalid JSON" with its empty payload;
// the next message is stored. ir_test covers only the parser.
// ---------------------------------------------------------------------------------------------

Deno.test({
  name: "probe: a 0-byte payload is dead-lettered as 'invalid JSON'; the next one is stored",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    await using table = await createAppTable(sql, {}, { schema });
    await svc.publish(new Uint8Array(0));
    await svc.publish(msg(table.name));
    await svc.idle(2);
    assert.deepEqual(await allErrors(sql, schema), [["", "invalid JSON", ""]]);
    const letters = await deadLetters(sql, svc.source, schema);
    assert.deepEqual(letters.map((d) => [d.error, d.payload.length, d.topic]), [
      ["invalid JSON", 0, svc.topic()],
    ]);
    assert.equal((await readRows(sql, table)).length, 1);
  },
});
