/**
 * AUTO_CREATE_TABLES (lib/provision.ts): the generated SQL (pure), and against the real
 * PostgreSQL: a new app's table gets the right columns, racing creators make one table,
 * no TimescaleDB call is issued where the extension is missing (it is, here), and the
 * service creates the table on the first message and never alters it afterwards.
 */

import assert from "node:assert/strict";
import postgres from "postgres";
import { type IrMessage, parseMessage } from "../lib/ir.ts";
import {
  columnsFor,
  createTableSql,
  literal,
  namesProblem,
  Provisioner,
  timescaleSql,
} from "../lib/provision.ts";
import {
  adminSql,
  createSchema,
  db,
  ensureDatabase,
  errorRows,
  ident,
  npmSockets,
  startTestService,
  TEST_DATABASE,
  uid,
} from "./helpers/service.ts";

function ir(json: unknown): IrMessage {
  const parsed = parseMessage(new TextEncoder().encode(JSON.stringify(json)));
  if (!parsed.ok) throw new Error(parsed.rejection.reason);
  return parsed.message;
}

/** Columns as the catalog has them: name, type with modifier, NOT NULL. */
async function columnsOf(sql: postgres.Sql, schema: string, table: string) {
  const rows = await sql<{ name: string; type: string; notnull: boolean }[]>`
    SELECT a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
           a.attnotnull AS notnull
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${schema} AND c.relname = ${table} AND a.attnum > 0
       AND NOT a.attisdropped
     ORDER BY a.attnum`;
  return rows.map((r) => ({ ...r }));
}

const WEATHER = {
  app_id: "x",
  data: [
    {
      time: 1700000000,
      device: "station-7",
      metadata: { site: "roof", floor: 3, indoor: false, note: null },
      payload: { temperature: 21.5, humidity: 40, status: "ok" },
    },
    { time: 1700000001, metadata: { floor: null, zone: 4 }, payload: { mode: "eco", t: 1 } },
  ],
};

Deno.test("columnsFor(): numbers DOUBLE PRECISION, other metadata and string metrics text", () => {
  assert.deepEqual(columnsFor(ir(WEATHER)), [
    { name: "floor", type: "DOUBLE PRECISION", metadata: true },
    { name: "indoor", type: "VARCHAR(128)", metadata: true },
    { name: "mode", type: "VARCHAR(128)", metadata: false },
    { name: "note", type: "VARCHAR(128)", metadata: true },
    { name: "site", type: "VARCHAR(128)", metadata: true },
    { name: "status", type: "VARCHAR(128)", metadata: false },
    { name: "zone", type: "DOUBLE PRECISION", metadata: true },
  ]);
  // A key that is a number in one reading and a string in another is text; a string
  // metric wins over a numeric metadata key of the same name, as on insert.
  assert.deepEqual(
    columnsFor(ir({
      app_id: "x",
      data: [
        { time: 1, metadata: { a: 1, level: 2 }, payload: { n: 1 } },
        { time: 2, metadata: { a: "b" }, payload: { level: "high" } },
      ],
    })),
    [
      { name: "a", type: "VARCHAR(128)", metadata: true },
      { name: "level", type: "VARCHAR(128)", metadata: false },
    ],
  );
});

Deno.test("createTableSql(): core columns, quoted extras, schema-qualified", () => {
  assert.equal(
    createTableSql("my schema", 'we"ird', [
      { name: "floor", type: "DOUBLE PRECISION", metadata: true },
      { name: 'x"); DROP TABLE t; --', type: "VARCHAR(128)", metadata: true },
    ]),
    `CREATE TABLE IF NOT EXISTS "my schema"."we""ird" (
  time TIMESTAMPTZ NOT NULL,
  metric VARCHAR(128) NOT NULL,
  value DOUBLE PRECISION NOT NULL,
  "floor" DOUBLE PRECISION,
  "x""); DROP TABLE t; --" VARCHAR(128)
)`,
  );
});

Deno.test("timescaleSql(): hypertable, compression segmented by metric and text tags, 7 days", () => {
  const columns = columnsFor(ir(WEATHER));
  assert.deepEqual(timescaleSql("public", "public", "alice_weather", columns), [
    {
      text: `SELECT "public".create_hypertable($1::pg_catalog.regclass, 'time', ` +
        `if_not_exists => TRUE)`,
      values: ['"public"."alice_weather"'],
    },
    {
      text: `ALTER TABLE "public"."alice_weather" SET (timescaledb.compress, ` +
        `timescaledb.compress_segmentby = E'"metric", "indoor", "note", "site"', ` +
        `timescaledb.compress_orderby = 'time DESC')`,
      values: [],
    },
    {
      text: `SELECT "public".add_compression_policy($1::pg_catalog.regclass, ` +
        `INTERVAL '7 days', if_not_exists => TRUE)`,
      values: ['"public"."alice_weather"'],
    },
  ]);
  // Hostile tag names stay inside the literal and inside their quotes.
  const [, alter] = timescaleSql("ts ext", "s", "t", [
    { name: "it's\\", type: "VARCHAR(128)", metadata: true },
    { name: 'a"b', type: "VARCHAR(128)", metadata: true },
  ]);
  assert.equal(
    alter!.text,
    `ALTER TABLE "s"."t" SET (timescaledb.compress, ` +
      `timescaledb.compress_segmentby = E'"metric", "it''s\\\\", "a""b"', ` +
      `timescaledb.compress_orderby = 'time DESC')`,
  );
});

Deno.test({
  name: "literal(): PostgreSQL reads back exactly the text it was given",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    for (const s of ["plain", "it's", "back\\slash", "\\'; DROP TABLE x; --", "ünï ☃", ""]) {
      const [row] = await sql.unsafe(`SELECT ${literal(s)} AS v`);
      assert.equal(row!.v, s);
    }
  },
});

Deno.test("namesProblem(): the same identifier rules as inserts", () => {
  assert.equal(namesProblem("public", "ok", []), null);
  assert.equal(
    namesProblem("public", "a".repeat(64), []),
    "table name is 64 bytes long (PostgreSQL allows 63)",
  );
  assert.equal(namesProblem("", "t", []), "schema name is empty");
  assert.equal(
    namesProblem("public", "t", [{ name: "value", type: "VARCHAR(128)", metadata: true }]),
    'column "value" is reserved',
  );
});

Deno.test({
  name: "a new app's table is created with the right columns, once, with no TimescaleDB call",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "prov");
    // Every statement the provisioner sends, as the server receives it.
    const sent: string[] = [];
    const traced = postgres({
      host: "127.0.0.1",
      port: 5432,
      user: "postgres",
      database: TEST_DATABASE,
      max: 1,
      onnotice: () => {},
      connection: { search_path: "pg_catalog" },
      debug: (_conn, query) => void sent.push(query),
    });
    try {
      const p = new Provisioner(traced, schema.name);
      const msg = ir({ ...WEATHER, app_id: "alice_weather" });
      assert.deepEqual(await p.ensureTable(msg), { ok: true, created: true, timescale: false });
      assert.deepEqual(await columnsOf(sql, schema.name, "alice_weather"), [
        { name: "time", type: "timestamp with time zone", notnull: true },
        { name: "metric", type: "character varying(128)", notnull: true },
        { name: "value", type: "double precision", notnull: true },
        { name: "floor", type: "double precision", notnull: false },
        { name: "indoor", type: "character varying(128)", notnull: false },
        { name: "mode", type: "character varying(128)", notnull: false },
        { name: "note", type: "character varying(128)", notnull: false },
        { name: "site", type: "character varying(128)", notnull: false },
        { name: "status", type: "character varying(128)", notnull: false },
        { name: "zone", type: "double precision", notnull: false },
      ]);
      // The extension was looked for (it is not installed here), and nothing else was called.
      assert.ok(sent.some((q) => q.includes("pg_extension")));
      assert.deepEqual(
        sent.filter((q) => /create_hypertable|compression|timescaledb\./i.test(q)),
        [],
      );
      // A second call finds it and changes nothing.
      assert.deepEqual(await p.ensureTable(msg), { ok: true, created: false, timescale: false });
      // Names that break the rules are refused before any SQL is sent.
      const before = sent.length;
      const long: IrMessage = { ...msg, appId: "ü".repeat(32) }; // ir.ts would refuse it first
      assert.deepEqual(await p.ensureTable(long), {
        ok: false,
        reason: "table name is 64 bytes long (PostgreSQL allows 63)",
      });
      assert.equal(sent.length, before);
    } finally {
      await traced.end({ timeout: 5 });
    }
  },
});

Deno.test({
  name: "racing creators (separate connections) produce one table; exactly one creates it",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "race");
    const pools = Array.from({ length: 6 }, () => adminSql(TEST_DATABASE, 1));
    try {
      for (let round = 0; round < 5; round++) {
        const table = `race_${uid()}`;
        const msg = ir({ ...WEATHER, app_id: table });
        const results = await Promise.all(
          pools.map((pool) => new Provisioner(pool, schema.name).ensureTable(msg)),
        );
        assert.equal(results.filter((r) => r.ok && r.created).length, 1, JSON.stringify(results));
        assert.ok(results.every((r) => r.ok));
        const [n] = await sql`SELECT count(*)::int AS n FROM pg_class c
          JOIN pg_namespace ns ON ns.oid = c.relnamespace
          WHERE ns.nspname = ${schema.name} AND c.relname = ${table}`;
        assert.equal(n!.n, 1);
        assert.equal((await columnsOf(sql, schema.name, table)).length, 10);
      }
    } finally {
      await Promise.all(pools.map((p) => p.end({ timeout: 5 })));
    }
  },
});

Deno.test({
  name: "service: a new app's first message creates its table; a new key later is rejected",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "auto");
    await using svc = await startTestService({
      schema: schema.name,
      env: { AUTO_CREATE_TABLES: "true" },
    });
    const app = `bob_${uid()}`;
    await svc.publish({
      app_id: app,
      data: {
        time: 1700000000.25,
        device: "d1",
        metadata: { site: "roof", floor: 3 },
        payload: { temperature: 21.5, status: "ok" },
      },
    });
    // A later message with a metadata key the table lacks: the table is not altered.
    await svc.publish({
      app_id: app,
      data: { time: 1700000001, device: "d2", metadata: { room: "7" }, payload: { t: 1 } },
    });
    await svc.idle(2);
    const q = `${ident(schema.name)}.${ident(app)}`;
    const rows = await sql.unsafe(
      `SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') AS time,
              metric, value, site, floor, status FROM ${q} ORDER BY metric`,
    );
    assert.deepEqual(rows.map((r) => ({ ...r })), [
      {
        time: "2023-11-14T22:13:20.250000",
        metric: "status",
        value: 0,
        site: "roof",
        floor: 3,
        status: "ok",
      },
      {
        time: "2023-11-14T22:13:20.250000",
        metric: "temperature",
        value: 21.5,
        site: "roof",
        floor: 3,
        status: null,
      },
    ]);
    assert.deepEqual((await columnsOf(sql, schema.name, app)).map((c) => c.name), [
      "time",
      "metric",
      "value",
      "floor",
      "site",
      "status",
    ]);
    const errors = await errorRows(sql, app, schema.name);
    assert.deepEqual(errors.map((e) => [e.error, e.device]), [["invalid metadata", "d2"]]);
  },
});

Deno.test({
  name: "service: without AUTO_CREATE_TABLES a missing table stays missing (invalid app)",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "noauto");
    await using svc = await startTestService({ schema: schema.name });
    const app = `carol_${uid()}`;
    await svc.publish({ app_id: app, data: { time: 1700000000, payload: { t: 1 } } });
    await svc.idle(1);
    const [found] = await sql`SELECT pg_catalog.to_regclass(${`${ident(schema.name)}.${
      ident(app)
    }`}) AS r`;
    assert.equal(found!.r, null);
    assert.deepEqual((await errorRows(sql, app, schema.name)).map((e) => e.error), ["invalid app"]);
  },
});

Deno.test({
  name: "service: a table that cannot be created is rejected as invalid app; others go on",
  ...npmSockets,
  async fn() {
    await ensureDatabase();
    await using sql = db();
    await using schema = await createSchema(sql, "clash");
    // CREATE TABLE also creates a row type of the table's name: an existing type of that
    // name makes it fail with 42710, a permanent error that must not stall the writer.
    await sql.unsafe(`CREATE TYPE ${ident(schema.name)}.clash AS ENUM ('a')`);
    await using svc = await startTestService({
      schema: schema.name,
      env: { AUTO_CREATE_TABLES: "true" },
    });
    const good = `dave_${uid()}`;
    await svc.publish({ app_id: "clash", data: { time: 1700000000, payload: { t: 1 } } });
    await svc.publish({ app_id: "clash", data: { time: 1700000001, payload: { t: 2 } } });
    await svc.publish({ app_id: good, data: { time: 1700000000, payload: { t: 3 } } });
    await svc.idle(3);
    assert.deepEqual((await errorRows(sql, "clash", schema.name)).map((e) => e.error), [
      "invalid app",
    ]);
    const [r] = await sql.unsafe(`SELECT metric, value FROM ${ident(schema.name)}.${ident(good)}`);
    assert.deepEqual({ ...r }, { metric: "t", value: 3 });
  },
});
