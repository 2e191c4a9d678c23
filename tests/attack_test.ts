/**
 * Attacks found by chaos testing, each pinned to the value the service must produce: messages
 * that multiply into more values than memory holds, and the service's own tables dropped
 * while it runs. Each integration test runs the service in a schema of its own.
 */

import assert from "node:assert/strict";
import { type IrMessage, parseMessage } from "../lib/ir.ts";
import {
  type ColumnInfo,
  MAX_CELLS_PER_MESSAGE,
  type TableInfo,
  translate,
} from "../lib/translate.ts";
import { BATCH_MAX_CELLS, PROGRESS_TABLE } from "../lib/writer.ts";
import {
  type AppTable,
  countRows,
  createAppTable,
  createSchema,
  db,
  deadLetters,
  ensureDatabase,
  ident,
  npmSockets,
  type Sql,
  startTestService,
  type TestService,
  waitFor,
} from "./helpers/service.ts";

const T0 = 1700000000.25;
const TOO_MANY = `message too large (over ${MAX_CELLS_PER_MESSAGE} values: rows x columns)`;

/** `n` metadata keys k0..k(n-1), all numbers. */
function metadata(n: number): Record<string, number> {
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, i]));
}

/** `n` numeric metrics m0..m(n-1) with value i. */
function metrics(n: number): Record<string, number> {
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [`m${i}`, i]));
}

/** Columns k0..k(n-1) as DOUBLE PRECISION, for createAppTable. */
function numberColumns(n: number): Record<string, string> {
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, "DOUBLE PRECISION"]));
}

/** An app table as the catalog would describe it, with `extra` number columns k0... */
function tableInfo(extra: number): TableInfo {
  const columns = new Map<string, ColumnInfo>([
    ["time", { kind: "timestamp", maxChars: null }],
    ["metric", { kind: "text", maxChars: 128 }],
    ["value", { kind: "number", maxChars: null }],
  ]);
  for (let i = 0; i < extra; i++) columns.set(`k${i}`, { kind: "number", maxChars: null });
  return { schema: "public", table: "bomb", columns };
}

function parsed(msg: unknown): IrMessage {
  const r = parseMessage(new TextEncoder().encode(JSON.stringify(msg)));
  if (!r.ok) throw new Error(r.rejection.reason);
  return r.message;
}

// -------------------------------------------------------------------------------------------
// Pure: the per-message limit
// -------------------------------------------------------------------------------------------

Deno.test("attack: metadata x metrics over MAX_CELLS_PER_MESSAGE is rejected, at the limit it is kept", () => {
  // 97 metadata keys + time, metric, value = 100 values per row.
  const at = parsed({
    app_id: "bomb",
    data: { time: T0, device: "d", metadata: metadata(97), payload: metrics(20_000) },
  });
  const ok = translate(at, tableInfo(97));
  assert.equal(ok.ok, true);
  assert.equal(ok.ok && ok.rows, 20_000);
  assert.equal(20_000 * 100, MAX_CELLS_PER_MESSAGE);

  const over = parsed({
    app_id: "bomb",
    data: { time: T0, device: "d", metadata: metadata(97), payload: metrics(20_001) },
  });
  const t = translate(over, tableInfo(97));
  assert.deepEqual(t, {
    ok: false,
    rejection: { reason: TOO_MANY, appId: "bomb", device: "d" },
    missingColumn: false,
  });
});

Deno.test("attack: the limit counts every reading of a data array together", () => {
  // Two readings of 10,000 rows x 100 values: 2,000,000 (kept); one row more is rejected.
  const reading = (n: number, device: string) => ({
    time: T0,
    device,
    metadata: metadata(97),
    payload: metrics(n),
  });
  assert.equal(
    translate(
      parsed({ app_id: "bomb", data: [reading(10_000, "a"), reading(10_000, "b")] }),
      tableInfo(97),
    ).ok,
    true,
  );
  const t = translate(
    parsed({ app_id: "bomb", data: [reading(10_000, "a"), reading(10_001, "b")] }),
    tableInfo(97),
  );
  assert.equal(t.ok, false);
  assert.deepEqual(!t.ok && t.rejection, { reason: TOO_MANY, appId: "bomb", device: "b" });
});

Deno.test("attack: a 4 MiB message of plain metrics stays under the per-message limit", () => {
  // The densest plain message: ~466,000 one-to-four character metric names.
  const names: string[] = [];
  let size = 60;
  for (let i = 0; size < 4 * 1024 * 1024 - 16; i++) {
    const name = i.toString(36);
    names.push(name);
    size += name.length + 5;
  }
  const payload = Object.fromEntries(names.map((n) => [n, 1]));
  const bytes = new TextEncoder().encode(
    JSON.stringify({ app_id: "plain", data: { time: T0, payload } }),
  );
  assert.ok(bytes.length <= 4 * 1024 * 1024, `${bytes.length} bytes`);
  const r = parseMessage(bytes);
  assert.equal(r.ok, true);
  const t = translate(r.ok ? r.message : (null as never), tableInfo(0));
  assert.equal(t.ok && t.rows, names.length);
});

// -------------------------------------------------------------------------------------------
// Through MQTT, the spool and PostgreSQL
// -------------------------------------------------------------------------------------------

interface Setup extends AsyncDisposable {
  sql: Sql;
  schema: string;
  svc: TestService;
}

/** A private schema and the service on it, with its tables created. */
async function setup(): Promise<Setup> {
  await ensureDatabase();
  const sql = db();
  const schema = await createSchema(sql, "attack");
  const svc = await startTestService({ schema: schema.name });
  await waitFor(
    async () => {
      const [r] = await sql`SELECT to_regclass(${`${ident(schema.name)}."errorTable"`}) IS NOT NULL
        AND to_regclass(${`${ident(schema.name)}.${PROGRESS_TABLE}`}) IS NOT NULL AS ok`;
      return r!.ok as boolean;
    },
    10_000,
    "service tables",
  );
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

/** Every "errorTable" row of the schema as [app_id, error, device], sorted. */
async function allErrors(sql: Sql, schema: string): Promise<string[][]> {
  const rows = await sql.unsafe(
    `SELECT app_id, error, device FROM ${ident(schema)}."errorTable"
      ORDER BY app_id COLLATE "C", error COLLATE "C", device COLLATE "C"`,
  );
  return rows.map((r) => [r.app_id, r.error, r.device]);
}

/** Holds an ACCESS EXCLUSIVE lock on `qualified` until released. */
async function lockTable(sql: Sql, qualified: string) {
  let release = () => {};
  const released = new Promise<void>((r) => (release = r));
  let locked = () => {};
  const isLocked = new Promise<void>((r) => (locked = r));
  const holding = sql.begin(async (tx) => {
    await tx.unsafe(`LOCK TABLE ${qualified} IN ACCESS EXCLUSIVE MODE`);
    locked();
    await released;
  });
  await Promise.race([isLocked, holding]);
  return {
    waiter: () =>
      waitFor(
        async () => {
          const [r] = await sql.unsafe(
            `SELECT count(*)::int AS n FROM pg_locks WHERE relation = $1::regclass AND NOT granted`,
            [qualified],
          );
          return (r!.n as number) > 0;
        },
        10_000,
        `a waiter on ${qualified}`,
      ),
    release: async () => {
      release();
      await holding;
    },
  };
}

Deno.test({
  name: "attack: a metadata x metrics bomb is rejected and recorded; the next message is stored",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup();
    const { sql, schema, svc } = s;
    try {
      table = await createAppTable(sql, numberColumns(97), { schema });
      const app = table.name;
      // 180 KB that once became 2 million values; the 4 MiB version (300 keys x 440,000
      // metrics) took 4 GB of heap, and four of them crashed the service on every restart.
      const bomb = {
        app_id: app,
        data: { time: T0, device: "bomb", metadata: metadata(97), payload: metrics(20_001) },
      };
      const atLimit = {
        app_id: app,
        data: { time: T0 + 1, device: "ok", metadata: metadata(97), payload: metrics(20_000) },
      };
      const small = { app_id: app, data: { time: T0 + 2, device: "small", payload: { x: 1 } } };
      const sent = await svc.publishAll([bomb, atLimit, small]);
      await svc.idle(3, 60_000);

      assert.deepEqual(await allErrors(sql, schema), [[app, TOO_MANY, "bomb"]]);
      const letters = await deadLetters(sql, svc.source, schema);
      assert.deepEqual(letters.map((d) => [d.device, d.error]), [["bomb", TOO_MANY]]);
      assert.deepEqual(letters[0]!.payload, sent[0]);
      const [r] = await sql.unsafe(
        `SELECT count(*)::int AS rows, count(k96)::int AS k96, sum(value) AS sum,
                count(*) FILTER (WHERE metric = 'x')::int AS small
           FROM ${table.qualified}`,
      );
      assert.deepEqual({ ...r }, {
        rows: 20_001,
        k96: 20_000,
        sum: (20_000 * 19_999) / 2 + 1,
        small: 1,
      });
    } finally {
      await table?.[Symbol.asyncDispose]();
    }
  },
});

Deno.test({
  name: "attack: big messages queued in the spool are written in batches of BATCH_MAX_CELLS",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup();
    const { sql, schema, svc } = s;
    try {
      table = await createAppTable(sql, numberColumns(97), { schema });
      const app = table.name;
      // 10,000 rows x 100 values = 1,000,000 values each: two fill a batch.
      const big = (i: number) => ({
        app_id: app,
        data: {
          time: T0 + i,
          device: `big-${i}`,
          metadata: metadata(97),
          payload: metrics(10_000),
        },
      });
      assert.equal(2 * 10_000 * 100, BATCH_MAX_CELLS);
      // The writer blocks on the first message, so the next five wait in the spool together.
      const lock = await lockTable(sql, table.qualified);
      try {
        await svc.publish(big(0));
        await lock.waiter();
        await svc.publishAll([1, 2, 3, 4, 5].map(big));
        await waitFor(() => svc.received >= 6, 10_000, "6 messages received");
      } finally {
        await lock.release();
      }
      await svc.idle(6, 60_000);
      assert.deepEqual(svc.batches, [
        { messages: 1, rows: 10_000, rejected: 0 },
        { messages: 2, rows: 20_000, rejected: 0 },
        { messages: 2, rows: 20_000, rejected: 0 },
        { messages: 1, rows: 10_000, rejected: 0 },
      ]);
      const [r] = await sql.unsafe(
        `SELECT count(*)::int AS rows, count(DISTINCT time)::int AS times FROM ${table.qualified}`,
      );
      assert.deepEqual({ ...r }, { rows: 60_000, times: 6 });
      assert.deepEqual(await allErrors(sql, schema), []);
    } finally {
      await table?.[Symbol.asyncDispose]();
    }
  },
});

Deno.test({
  name: 'attack: "errorTable" dropped while running is created again; the writer goes on',
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup();
    const { sql, schema, svc } = s;
    try {
      table = await createAppTable(sql, {}, { schema });
      const app = table.name;
      await sql.unsafe(`DROP TABLE ${ident(schema)}."errorTable"`);
      await svc.publishAll([
        { app_id: app, data: { time: T0, device: "bad", payload: { x: [1] } } },
        { app_id: app, data: { time: T0 + 1, device: "good", payload: { x: 2 } } },
      ]);
      // Before the fix the writer retried "relation ... does not exist" forever.
      await svc.idle(2, 20_000);
      assert.deepEqual(await allErrors(sql, schema), [
        [app, "unexpected object (expected primitive)", "bad"],
      ]);
      assert.deepEqual(
        (await deadLetters(sql, svc.source, schema)).map((d) => d.device),
        ["bad"],
      );
      assert.equal(await countRows(sql, table.qualified), 1);
    } finally {
      await table?.[Symbol.asyncDispose]();
    }
  },
});

Deno.test({
  name: "attack: the progress table dropped while running is created again with the position",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup();
    const { sql, schema, svc } = s;
    try {
      table = await createAppTable(sql, {}, { schema });
      const app = table.name;
      await svc.publish({ app_id: app, data: { time: T0, device: "first", payload: { x: 1 } } });
      await svc.idle(1);
      await sql.unsafe(`DROP TABLE ${ident(schema)}.${PROGRESS_TABLE}`);
      await svc.publish({ app_id: app, data: { time: T0 + 1, device: "next", payload: { x: 2 } } });
      await svc.idle(2, 20_000);
      assert.deepEqual(
        (await sql.unsafe(`SELECT value FROM ${table.qualified} ORDER BY time`)).map((r) =>
          r.value
        ),
        [1, 2],
      );
      const progress = await sql.unsafe(
        `SELECT last_seq::int AS seq FROM ${ident(schema)}.${PROGRESS_TABLE} WHERE client_id = $1`,
        [svc.config.mqtt.clientId],
      );
      assert.deepEqual(progress.map((r) => r.seq), [2]);
      assert.deepEqual(await allErrors(sql, schema), []);
    } finally {
      await table?.[Symbol.asyncDispose]();
    }
  },
});

Deno.test({
  name: "attack: a rejection neither error table takes is logged and passed; the writer goes on",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup();
    const { sql, schema, svc } = s;
    try {
      table = await createAppTable(sql, {}, { schema });
      const app = table.name;
      // Both tables refuse this device (an operator's constraint, a trigger, ...).
      for (const t of ['"errorTable"', "sif_dead_letter"]) {
        await sql.unsafe(`ALTER TABLE ${ident(schema)}.${t}
          ADD CONSTRAINT no_refused CHECK (device <> 'refused')`);
      }
      await svc.publishAll([
        { app_id: app, data: { time: T0, device: "refused", payload: { x: [1] } } },
        { app_id: app, data: { time: T0 + 1, device: "bad", payload: { x: [1] } } },
        { app_id: app, data: { time: T0 + 2, device: "good", payload: { x: 2 } } },
      ]);
      // Before the fix the writer retried the first message forever.
      await svc.idle(3, 20_000);
      assert.deepEqual(await allErrors(sql, schema), [
        [app, "unexpected object (expected primitive)", "bad"],
      ]);
      assert.deepEqual((await deadLetters(sql, svc.source, schema)).map((d) => d.device), ["bad"]);
      assert.equal(await countRows(sql, table.qualified), 1);
    } finally {
      await table?.[Symbol.asyncDispose]();
    }
  },
});
