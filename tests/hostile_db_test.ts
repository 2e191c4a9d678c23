/**
 * Hostile input at the database level, through the real Mosquitto and PostgreSQL. Each test
 * runs the service in a schema of its own (TS_SCHEMA), so it can assert the exact content of
 * "errorTable" and sif_dead_letter and prove that no other table in the schema changed.
 */

import assert from "node:assert/strict";
import {
  type AppTable,
  countRows,
  createAppTable,
  createSchema,
  db,
  deadLetters,
  ensureDatabase,
  fingerprint,
  ident,
  npmSockets,
  readRows,
  sortedTuples,
  type Sql,
  startTestService,
  type TestService,
  type TestServiceOptions,
  uid,
  waitFor,
} from "./helpers/service.ts";

const T0 = 1700000000.25;
const T0_ISO = "2023-11-14T22:13:20.250000Z";
/** Tables the service writes by design; everything else must stay as it was. */
const SERVICE_TABLES = ["errorTable", "sif_dead_letter", "sif_stream_progress"];

/** Waits until the service created its tables in `schema` (so fingerprints compare). */
async function serviceReady(sql: Sql, schema: string): Promise<void> {
  await waitFor(
    async () => {
      const [r] = await sql`SELECT to_regclass(${`${ident(schema)}."errorTable"`}) IS NOT NULL
        AND to_regclass(${`${ident(schema)}.sif_stream_progress`}) IS NOT NULL AS ok`;
      return r!.ok as boolean;
    },
    10_000,
    "service tables",
  );
}

/** Every "errorTable" row of the schema as [app_id, error, device], sorted. */
async function allErrors(sql: Sql, schema: string): Promise<string[][]> {
  const rows = await sql.unsafe(
    `SELECT app_id, error, device FROM ${ident(schema)}."errorTable"
      ORDER BY app_id COLLATE "C", error COLLATE "C", device COLLATE "C"`,
  );
  return rows.map((r) => [r.app_id, r.error, r.device]);
}

/** A plain message for `app` with one metric. */
function msg(app: string, extra: Record<string, unknown> = {}, device = "hostile") {
  return { app_id: app, data: { time: T0, device, payload: { x: 1 }, ...extra } };
}

interface Setup extends AsyncDisposable {
  sql: Sql;
  schema: string;
  svc: TestService;
  /** Fingerprint of every table but the service's and `changing`. */
  others(): Promise<Record<string, string>>;
}

/** A private schema, the service on it (ready), and a fingerprint helper. */
async function setup(
  changing: () => readonly string[] = () => [],
  options: Omit<TestServiceOptions, "schema"> = {},
): Promise<Setup> {
  await ensureDatabase();
  const sql = db();
  const schema = await createSchema(sql, "hostile");
  const svc = await startTestService({ ...options, schema: schema.name });
  await serviceReady(sql, schema.name);
  return {
    sql,
    schema: schema.name,
    svc,
    others: () => fingerprint(sql, schema.name, [...SERVICE_TABLES, ...changing()]),
    [Symbol.asyncDispose]: async () => {
      await svc[Symbol.asyncDispose]();
      await schema[Symbol.asyncDispose]();
      await sql[Symbol.asyncDispose]();
    },
  };
}

Deno.test({
  name: "hostile app ids are 'invalid app' and every table stays intact",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    // Decoys: a non-app table, a table named y (target of the injection) and an app table.
    await sql.unsafe(`CREATE TABLE ${ident(schema)}.y (id int, note text)`);
    await sql.unsafe(`INSERT INTO ${ident(schema)}.y VALUES (1, 'keep me')`);
    const victim = await createAppTable(sql, {}, { schema, name: "victim" });
    await sql.unsafe(`INSERT INTO ${victim.qualified} VALUES (now(), 'm', 1)`);
    // Looks like an app table, but a view is not one.
    await sql.unsafe(`CREATE VIEW ${ident(schema)}.view_app AS SELECT * FROM ${victim.qualified}`);
    const before = await s.others();
    const sidesBefore = await fingerprint(sql, "public", []);

    const appIds = [
      "errorTable",
      "sif_dead_letter",
      "sif_stream_progress",
      "pg_class",
      "pg_catalog.pg_class",
      'public"."x',
      `${schema}"."victim`,
      'x"; DROP TABLE y; --',
      "y",
      "victim ",
      "Victim",
      "view_app",
    ];
    // Metadata named like the columns of the service's own tables, should any be reached.
    const metadata = { app_id: "pwned", error: "pwned", device: "pwned", topic: "pwned" };
    const sent = await svc.publishAll(appIds.map((a) => msg(a, { metadata })));
    await svc.idle(appIds.length);

    assert.deepEqual(
      (await allErrors(sql, schema)).map(([a, e]) => [a, e]),
      sortedTuples(appIds.map((a) => [a, "invalid app"])),
    );
    const dead = await deadLetters(sql, svc.source, schema);
    assert.deepEqual(dead.map((d) => [d.app_id, d.error]), appIds.map((a) => [a, "invalid app"]));
    assert.deepEqual(dead.map((d) => d.payload), sent);
    assert.deepEqual(await s.others(), before);
    assert.equal(await countRows(sql, victim.qualified), 1);
    assert.deepEqual(await fingerprint(sql, "public", []), sidesBefore);
  },
});

Deno.test({
  name: "reserved words and mixed case are real column names; 'user' is not 'User'",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, {
      select: "VARCHAR(128)",
      User: "VARCHAR(128)",
      "Order Date": "VARCHAR(128)",
      "from": "DOUBLE PRECISION",
    }, { schema, name: "Mixed Case App" });
    const before = await s.others();
    await svc.publishAll([
      msg(table.name, {
        metadata: { select: "s1", User: "U1", "Order Date": "2024-01-02", from: 7 },
      }, "ok-1"),
      msg(table.name, { payload: { select: "as metric", n: 2 } }, "ok-2"),
      msg(table.name, { metadata: { user: "lower" } }, "bad-user"),
      msg(table.name.toLowerCase(), {}, "bad-table-case"),
    ]);
    await svc.idle(4);
    assert.deepEqual(await readRows(sql, table), [
      {
        time: T0_ISO,
        metric: "n",
        value: 2,
        select: null,
        User: null,
        "Order Date": null,
        from: null,
      },
      {
        time: T0_ISO,
        metric: "select",
        value: 0,
        select: "as metric",
        User: null,
        "Order Date": null,
        from: null,
      },
      {
        time: T0_ISO,
        metric: "x",
        value: 1,
        select: "s1",
        User: "U1",
        "Order Date": "2024-01-02",
        from: 7,
      },
    ]);
    assert.deepEqual(await allErrors(sql, schema), [
      ["Mixed Case App", "invalid metadata", "bad-user"],
      ["mixed case app", "invalid app", "bad-table-case"],
    ]);
    assert.deepEqual(await s.others(), before);
  },
});

Deno.test({
  name: "identifiers: 63 bytes are used, 64 bytes are rejected (never truncated into the 63)",
  ...npmSockets,
  async fn() {
    const tables: AppTable[] = [];
    await using s = await setup(() => tables.map((t) => t.name));
    const { sql, schema, svc } = s;
    const ascii63 = ("p63_" + uid()).padEnd(63, "a");
    const multi63 = "m63_" + uid().padEnd(57, "b") + "é"; // 61 ASCII + 2-byte char = 63 bytes
    assert.equal(new TextEncoder().encode(multi63).length, 63);
    const col63 = "c".repeat(63);
    for (const name of [ascii63, multi63]) {
      tables.push(await createAppTable(sql, { [col63]: "VARCHAR(128)" }, { schema, name }));
    }
    const before = await s.others();
    await svc.publishAll([
      msg(ascii63, { metadata: { [col63]: "ascii" } }, "ok-ascii"),
      msg(multi63, { metadata: { [col63]: "multi" } }, "ok-multi"),
      msg(ascii63 + "X", {}, "long-app"), // 64 bytes: PostgreSQL would truncate to ascii63
      msg(multi63.slice(0, -1) + "éé", {}, "long-multi"), // 65 bytes
      msg(ascii63, { metadata: { [col63 + "d"]: "v" } }, "long-key"),
      msg(ascii63, { payload: { [col63 + "é"]: "v" } }, "long-metric"),
      msg(ascii63, { payload: { [col63 + "é"]: 5 } }, "numeric-metric"), // a value, not a column
    ]);
    await svc.idle(7);
    assert.deepEqual(await readRows(sql, tables[0]!), [
      { time: T0_ISO, metric: col63 + "é", value: 5, [col63]: null },
      { time: T0_ISO, metric: "x", value: 1, [col63]: "ascii" },
    ]);
    assert.deepEqual(await readRows(sql, tables[1]!), [
      { time: T0_ISO, metric: "x", value: 1, [col63]: "multi" },
    ]);
    assert.deepEqual(
      await allErrors(sql, schema),
      sortedTuples([
        [ascii63, "metadata key is 64 bytes long (PostgreSQL allows 63)", "long-key"],
        [ascii63, "string metric is 65 bytes long (PostgreSQL allows 63)", "long-metric"],
        [ascii63 + "X", "app_id is 64 bytes long (PostgreSQL allows 63)", ""],
        [multi63.slice(0, -1) + "éé", "app_id is 65 bytes long (PostgreSQL allows 63)", ""],
      ]),
    );
    assert.deepEqual(await s.others(), before);
  },
});

Deno.test({
  name: "a hostile search_path (evil schema, functions, operator, type) changes nothing",
  ...npmSockets,
  async fn() {
    const database = `sif_sp_${uid()}`;
    {
      await using admin = db("postgres");
      await admin.unsafe(`CREATE DATABASE ${ident(database)}`);
    }
    try {
      await hostileSearchPath(database);
    } finally {
      await using admin = db("postgres");
      await admin.unsafe(`DROP DATABASE IF EXISTS ${ident(database)} WITH (FORCE)`);
    }
  },
});

/** Traps for a session whose search_path is the database's `evil, pg_catalog, public`. */
const TRAPS = `
  CREATE SCHEMA evil;
  CREATE TABLE evil.tripwire (what text NOT NULL);
  CREATE FUNCTION evil.trip(what text) RETURNS boolean LANGUAGE plpgsql AS $f$
    BEGIN INSERT INTO evil.tripwire VALUES (what); RETURN true; END $f$;
  -- Single-argument unnest: a multi-argument unnest would be the first to resolve here.
  CREATE FUNCTION evil.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $f$
    BEGIN PERFORM evil.trip('unnest(text[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $f$;
  -- The cast ::timestamptz of the app insert resolves the type name through search_path.
  CREATE DOMAIN evil.timestamptz AS pg_catalog.timestamptz CHECK (evil.trip('timestamptz'));
  -- "a.attnum > 0" in the catalog query (int2 > int4).
  CREATE FUNCTION evil.gt(a int2, b int4) RETURNS boolean LANGUAGE plpgsql AS $f$
    BEGIN PERFORM evil.trip('>(int2,int4)'); RETURN a::int4 OPERATOR(pg_catalog.>) b; END $f$;
  CREATE OPERATOR evil.> (LEFTARG = int2, RIGHTARG = int4, FUNCTION = evil.gt);
  -- now() and to_timestamp() of the errorTable upsert and the dead letter.
  CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
    BEGIN PERFORM evil.trip('now()'); RETURN pg_catalog.now(); END $f$;
  CREATE FUNCTION evil.to_timestamp(x float8) RETURNS timestamptz LANGUAGE plpgsql AS $f$
    BEGIN PERFORM evil.trip('to_timestamp(float8)'); RETURN pg_catalog.to_timestamp(x); END $f$;
`;

async function hostileSearchPath(database: string): Promise<void> {
  const app = "app_sp";
  {
    await using sql = db(database);
    await sql.unsafe(`
      CREATE TABLE public.${app} (time timestamptz NOT NULL, metric varchar(128) NOT NULL,
        value double precision NOT NULL, site varchar(128));
      ${TRAPS}
      CREATE TABLE evil.${app} (LIKE public.${app});
      CREATE TABLE evil."errorTable" (app_id text, error text, device text, "timestamp" timestamptz);
      ALTER DATABASE ${ident(database)} SET search_path = evil, pg_catalog, public;
    `);
  }
  {
    // The traps are armed: a session that takes the database's search_path walks into them.
    await using sql = db(database);
    const [p] = await sql`SHOW search_path`;
    assert.equal(p!.search_path, "evil, pg_catalog, public");
    await sql.unsafe(`SELECT count(*) FROM unnest('{a}'::text[])`);
    await sql.unsafe(`SELECT '2024-01-01'::timestamptz, now(), to_timestamp(1::float8)`);
    await sql.unsafe(`SELECT count(*) FROM pg_attribute a WHERE a.attnum > 0`);
    const trips = await sql.unsafe(`SELECT DISTINCT what FROM evil.tripwire ORDER BY 1`);
    assert.deepEqual(trips.map((r) => r.what), [
      ">(int2,int4)",
      "now()",
      "timestamptz",
      "to_timestamp(float8)",
      "unnest(text[])",
    ]);
    await sql.unsafe(`DELETE FROM evil.tripwire`);
  }
  {
    await using svc = await startTestService({ database });
    await svc.publishAll([
      msg(app, { metadata: { site: "roof" }, payload: { x: 1, s: 2.5 } }),
      msg(app, { metadata: { nope: 1 } }, "dev-bad"),
    ]);
    await svc.idle(2);
    await svc.stop();
    await using sql = db(database);
    await sql.unsafe(`SET search_path = pg_catalog, public`);
    assert.deepEqual(
      (await sql.unsafe(`SELECT DISTINCT what FROM evil.tripwire ORDER BY 1`)).map((r) => r.what),
      [],
    );
    const rows = await sql.unsafe(
      `SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS time,
              metric, value, site FROM public.${app} ORDER BY metric`,
    );
    assert.deepEqual(rows.map((r) => ({ ...r })), [
      { time: T0_ISO, metric: "s", value: 2.5, site: "roof" },
      { time: T0_ISO, metric: "x", value: 1, site: "roof" },
    ]);
    assert.equal(await countRows(sql, `evil.${app}`), 0);
    assert.equal(await countRows(sql, `evil."errorTable"`), 0);
    const errors = await sql.unsafe(`SELECT app_id, error, device FROM public."errorTable"`);
    assert.deepEqual(errors.map((r) => ({ ...r })), [
      { app_id: app, error: "invalid metadata", device: "dev-bad" },
    ]);
    assert.equal(await countRows(sql, "public.sif_dead_letter"), 1);
    // The service's own tables were created in public, none in evil.
    const evilTables = await sql.unsafe(
      `SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE nspname = 'evil' AND relkind = 'r' ORDER BY 1`,
    );
    assert.deepEqual(evilTables.map((r) => r.relname), ["app_sp", "errorTable", "tripwire"]);
  }
}

Deno.test({
  name: "more rows than 65,535 parameters: 14,000 readings x 5 metrics, and 70,000 metrics",
  ...npmSockets,
  async fn() {
    const tables: AppTable[] = [];
    await using s = await setup(() => tables.map((t) => t.name));
    const { sql, schema, svc } = s;
    const readings = await createAppTable(sql, { site: "VARCHAR(128)" }, { schema });
    const wide = await createAppTable(sql, {}, { schema });
    tables.push(readings, wide);
    const before = await s.others();
    const n = 14_000;
    const data = Array.from({ length: n }, (_, i) => ({
      time: T0 + i,
      metadata: { site: `s${i % 7}` },
      payload: { a: i, b: i + 0.5, c: -i, d: i * 2, e: i % 2 === 0 },
    }));
    const payload: Record<string, number> = {};
    for (let i = 0; i < 70_000; i++) payload[`m${i}`] = i / 2;
    const started = performance.now();
    const sent = await svc.publishAll([
      { app_id: readings.name, data },
      { app_id: wide.name, data: { time: T0, payload } },
    ]);
    await svc.idle(2, 60_000);
    const seconds = (performance.now() - started) / 1000;
    console.log(
      `140,000 rows in 2 messages (${sent.map((b) => b.length).join(" + ")} bytes): ` +
        `${seconds.toFixed(2)} s`,
    );

    const sumI = (n * (n - 1)) / 2;
    const [r] = await sql.unsafe(
      `SELECT count(*)::int AS rows, sum(value) AS sum, count(DISTINCT time)::int AS times,
              count(site)::int AS sites, min(metric) AS min_metric, max(metric) AS max_metric
         FROM ${readings.qualified}`,
    );
    assert.deepEqual({ ...r }, {
      rows: 70_000,
      sum: sumI + (sumI + n / 2) - sumI + 2 * sumI + n / 2,
      times: n,
      sites: 70_000,
      min_metric: "a",
      max_metric: "e",
    });
    const last = await sql.unsafe(
      `SELECT metric, value, site FROM ${readings.qualified}
        WHERE time = to_timestamp(${T0 + n - 1}) ORDER BY metric`,
    );
    assert.deepEqual(last.map((x) => ({ ...x })), [
      { metric: "a", value: n - 1, site: "s6" },
      { metric: "b", value: n - 0.5, site: "s6" },
      { metric: "c", value: -(n - 1), site: "s6" },
      { metric: "d", value: 2 * (n - 1), site: "s6" },
      { metric: "e", value: 0, site: "s6" },
    ]);
    const [w] = await sql.unsafe(
      `SELECT count(*)::int AS rows, count(DISTINCT metric)::int AS metrics, sum(value) AS sum
         FROM ${wide.qualified}`,
    );
    assert.deepEqual({ ...w }, { rows: 70_000, metrics: 70_000, sum: (70_000 * 69_999) / 4 });
    assert.deepEqual(await allErrors(sql, schema), []);
    assert.deepEqual(await s.others(), before);
  },
});

Deno.test({
  name: "text longer than varchar(128) and NUL characters are rejected; nothing stored",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, { site: "VARCHAR(128)", note: "TEXT" }, { schema });
    const before = await s.others();
    const app = table.name;
    const two = { x: 1, y: 2 }; // a good metric next to the bad value: all or nothing
    const cases: [string, Record<string, unknown> | Uint8Array, string | null][] = [
      ["ok-128", msg(app, { metadata: { site: "s".repeat(128) } }, "ok-128"), null],
      ["ok-128-multi", msg(app, { metadata: { site: "é".repeat(128) } }, "ok-128-multi"), null],
      ["ok-128-emoji", msg(app, { metadata: { site: "😀".repeat(128) } }, "ok-128-emoji"), null],
      ["ok-long-text", msg(app, { metadata: { note: "n".repeat(10_000) } }, "ok-long-text"), null],
      [
        "long-129",
        msg(app, { metadata: { site: "s".repeat(129) }, payload: two }, "long-129"),
        'value too long for column "site" (max 128 characters)',
      ],
      [
        "long-emoji",
        msg(app, { metadata: { site: "😀".repeat(129) }, payload: two }, "long-emoji"),
        'value too long for column "site" (max 128 characters)',
      ],
      [
        "long-metric-text",
        msg(app, { payload: { ...two, site: "m".repeat(129) } }, "long-metric-text"),
        'value too long for column "site" (max 128 characters)',
      ],
      [
        "long-metric-name",
        msg(app, { payload: { ...two, ["k".repeat(129)]: 1 } }, "long-metric-name"),
        "metric name too long (max 128 characters)",
      ],
      [
        "nul-meta",
        msg(app, { metadata: { site: "a\u0000b" }, payload: two }, "nul-meta"),
        "text contains a NUL character",
      ],
      [
        "nul-metric-text",
        msg(app, { payload: { ...two, site: "\u0000" } }, "nul-metric-text"),
        "text contains a NUL character",
      ],
      [
        "nul-metric-name",
        msg(app, { payload: { ...two, "a\u0000": 1 } }, "nul-metric-name"),
        "metric name contains a NUL character",
      ],
      [
        "nul-key",
        msg(app, { metadata: { "si\u0000te": "x" }, payload: two }, "nul-key"),
        "metadata key contains a NUL character",
      ],
      [
        "lone-surrogate",
        msg(app, { metadata: { site: "a\ud800b" }, payload: two }, "lone-surrogate"),
        "text is not valid Unicode",
      ],
    ];
    const sent = await svc.publishAll(cases.map(([, m]) => m));
    // Not attributable to a device: bad app id, bad device, bytes that are not UTF-8.
    const odd: [Record<string, unknown> | Uint8Array, string, string, string][] = [
      [msg(`${app}\u0000`), `${app}\uFFFD`, "app_id contains a NUL character", ""],
      [msg(app, {}, "dev\u0000ice"), app, "device contains a NUL character", "dev\uFFFDice"],
      [new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]), "", "message is not valid UTF-8", ""],
    ];
    const sentOdd = await svc.publishAll(odd.map(([m]) => m));
    await svc.idle(cases.length + odd.length);

    const rows = await readRows(sql, table);
    assert.deepEqual(rows.map((r) => [r.metric, r.site, r.note]), [
      ["x", "s".repeat(128), null],
      ["x", "é".repeat(128), null],
      ["x", "😀".repeat(128), null],
      ["x", null, "n".repeat(10_000)],
    ]);
    const expected = sortedTuples([
      ...cases.filter(([, , e]) => e !== null).map(([d, , e]) => [app, e!, d]),
      ...odd.map(([, a, e, d]) => [a, e, d]),
    ]);
    assert.deepEqual(await allErrors(sql, schema), expected);
    const dead = await deadLetters(sql, svc.source, schema);
    const bad = [...cases.entries()].filter(([, [, , e]]) => e !== null).map(([i]) => sent[i]);
    assert.deepEqual(dead.map((d) => d.payload), [...bad, ...sentOdd]);
    assert.deepEqual(await s.others(), before);
  },
});

/** Holds an ACCESS EXCLUSIVE lock on `qualified` until `release()`; resolves once locked. */
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
    /** Resolves once somebody waits for the lock. */
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
  name: "poison isolation: rows PostgreSQL rejects are split out of their batch, the rest stored",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    // The cache knows the smallint range but not the CHECK: only PostgreSQL knows that.
    table = await createAppTable(sql, { tiny: "SMALLINT", site: "VARCHAR(128)" }, {
      schema,
      constraints: "CONSTRAINT small_value CHECK (value < 1000)",
    });
    const before = await s.others();
    const app = table.name;
    const good = (v: number) => msg(app, { payload: { v } }, `good-${v}`);
    // The writer blocks on the first message, so the next five make one batch.
    const lock = await lockTable(sql, table.qualified);
    try {
      await svc.publish(good(1));
      await lock.waiter();
      await svc.publishAll([
        good(2),
        msg(app, { payload: { v: 5000 } }, "check"),
        good(3),
        msg(app, { metadata: { tiny: 70000 } }, "smallint"),
        good(4),
      ]);
      await waitFor(() => svc.received >= 6, 10_000, "6 messages received");
    } finally {
      await lock.release();
    }
    await svc.idle(6);
    assert.deepEqual((await readRows(sql, table)).map((r) => r.value), [1, 2, 3, 4]);
    assert.deepEqual(await allErrors(sql, schema), [
      [
        app,
        `database rejected the row: new row for relation "${app}" violates check constraint ` +
        `"small_value" (SQLSTATE 23514)`,
        "check",
      ],
      // Found before the insert since the cache knows the column's range.
      [app, 'value out of range for column "tiny" (smallint)', "smallint"],
    ]);
    assert.deepEqual(
      (await deadLetters(sql, svc.source, schema)).map((d) => d.device),
      ["check", "smallint"],
    );
    // One batch of five: three stored, two rejected.
    assert.deepEqual(svc.batches, [
      { messages: 1, rows: 1, rejected: 0 },
      { messages: 5, rows: 3, rejected: 2 },
    ]);
    assert.deepEqual(await s.others(), before);
  },
});

Deno.test({
  name: "schema changes under the cache: type changed and column dropped after it was filled",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, { floor: "VARCHAR(128)", gone: "VARCHAR(128)" }, {
      schema,
    });
    const app = table.name;
    await svc.publish(msg(app, { metadata: { floor: "3", gone: "g" }, payload: { v: 1 } }));
    await svc.idle(1); // the cache now says floor is text and gone exists
    await sql.unsafe(`ALTER TABLE ${table.qualified}
      ALTER COLUMN floor TYPE DOUBLE PRECISION USING floor::double precision,
      DROP COLUMN gone`);
    await svc.publishAll([
      msg(app, { metadata: { floor: 4 }, payload: { v: 2 } }, "ok-4"),
      msg(app, { metadata: { floor: "three" }, payload: { v: 3 } }, "string"),
      msg(app, { metadata: { gone: "g" }, payload: { v: 4 } }, "dropped"),
      msg(app, { metadata: { floor: 5 }, payload: { v: 5 } }, "ok-5"),
    ]);
    await svc.idle(5);
    assert.deepEqual((await readRows(sql, table, ["floor"])).map((r) => [r.value, r.floor]), [
      [1, 3],
      [2, 4],
      [5, 5],
    ]);
    assert.deepEqual(await allErrors(sql, schema), [
      [app, "invalid metadata", "dropped"],
      [app, "unexpected string (expected number)", "string"],
    ]);
  },
});

Deno.test({
  name: "schema changes under the cache: a table or column created right after a miss is used",
  ...npmSockets,
  async fn() {
    const tables: AppTable[] = [];
    await using s = await setup(() => tables.map((t) => t.name));
    const { sql, schema, svc } = s;
    const late = `late_${uid()}`;
    await svc.publish(msg(late, {}, "before-create"));
    await svc.idle(1);
    tables.push(await createAppTable(sql, {}, { schema, name: late }));
    await svc.publish(msg(late, {}, "after-create"));
    await svc.idle(2);
    assert.deepEqual(await allErrors(sql, schema), [[late, "invalid app", "before-create"]]);
    assert.deepEqual((await readRows(sql, tables[0]!)).length, 1);

    const grows = await createAppTable(sql, {}, { schema });
    tables.push(grows);
    await svc.publish(msg(grows.name, {}, "fills-cache"));
    await svc.idle(3);
    await sql.unsafe(`ALTER TABLE ${grows.qualified} ADD COLUMN site VARCHAR(128)`);
    await svc.publish(msg(grows.name, { metadata: { site: "new" } }, "new-column"));
    await svc.idle(4);
    assert.deepEqual((await readRows(sql, grows, ["site"])).map((r) => r.site), [null, "new"]);
    assert.deepEqual(await allErrors(sql, schema), [[late, "invalid app", "before-create"]]);
  },
});

/**
 * Makes every INSERT into `table` of more than `maxRows` rows fail with `sqlstate`, as a
 * full lock table (53200) or statement_timeout (57014) does for a batch that is too big.
 */
async function failLargeInserts(
  sql: Sql,
  table: AppTable,
  sqlstate: string,
  maxRows: number,
  /** Fail only while this table (schema-qualified) has a row: a passing condition. */
  whileRowIn?: string,
) {
  const fn = `${ident(table.schema)}.${ident(`${table.name}_limit`)}`;
  const gate = whileRowIn ? `EXISTS (SELECT FROM ${whileRowIn}) AND` : "";
  await sql.unsafe(`CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
      IF ${gate} (SELECT count(*) FROM new_rows) > ${maxRows} THEN
        RAISE EXCEPTION USING ERRCODE = '${sqlstate}', MESSAGE = 'too much for this test';
      END IF;
      RETURN NULL;
    END $f$`);
  await sql.unsafe(`CREATE TRIGGER size_limit AFTER INSERT ON ${table.qualified}
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ${fn}()`);
}

for (
  const [sqlstate, what] of [["53200", "out of shared memory"], ["57014", "timeout"]] as const
) {
  Deno.test({
    name: `a batch that fails with ${sqlstate} (${what}) is split, not retried whole forever`,
    ...npmSockets,
    async fn() {
      let table: AppTable | null = null;
      await using s = await setup(() => [table!.name]);
      const { sql, schema, svc } = s;
      table = await createAppTable(sql, {}, { schema });
      await failLargeInserts(sql, table, sqlstate, 2);
      const app = table.name;
      const one = (v: number) => msg(app, { payload: { v } }, `d${v}`);
      // The writer blocks on the first message, so the next six make one batch of 6 rows.
      const lock = await lockTable(sql, table.qualified);
      try {
        await svc.publish(one(1));
        await lock.waiter();
        await svc.publishAll([2, 3, 4, 5, 6, 7].map(one));
        await waitFor(() => svc.received >= 7, 10_000, "7 messages received");
      } finally {
        await lock.release();
      }
      await svc.idle(7, 20_000);
      assert.deepEqual(
        (await readRows(sql, table)).map((r) => r.value),
        [1, 2, 3, 4, 5, 6, 7],
      );
      assert.deepEqual(await allErrors(sql, schema), []);
      assert.equal(svc.batches.reduce((n, b) => n + b.rows, 0), 7);
    },
  });
}

Deno.test({
  name: "a lone message that keeps hitting statement_timeout is rejected after its retry time",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name], { writerTimings: { loneCancelWaitMs: 1500 } });
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, {}, { schema });
    await failLargeInserts(sql, table, "57014", 2);
    const app = table.name;
    await svc.publish(msg(app, { payload: { a: 1, b: 2, c: 3 } }, "slow"));
    await svc.publish(msg(app, { payload: { v: 9 } }, "after"));
    await svc.idle(2, 30_000);
    assert.deepEqual((await readRows(sql, table)).map((r) => r.value), [9]);
    assert.deepEqual(await allErrors(sql, schema), [
      [app, "database rejected the row: too much for this test (SQLSTATE 57014)", "slow"],
    ]);
    assert.deepEqual((await deadLetters(sql, svc.source, schema)).map((d) => d.device), ["slow"]);
  },
});

Deno.test({
  name: "a cached app table replaced by a view onto another table: nothing written through it",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, {}, { schema });
    const app = table.name;
    const secret = `${ident(schema)}.${ident(`${app}_secret`)}`;
    await sql.unsafe(`CREATE TABLE ${secret} (time TIMESTAMPTZ, note TEXT, score FLOAT8)`);
    await sql.unsafe(`INSERT INTO ${secret} VALUES (now(), 'topsecret', 42)`);
    // Cached as an app table by the first message.
    await svc.publish(msg(app, { payload: { before: 1 } }, "before"));
    await svc.idle(1);
    assert.deepEqual((await readRows(sql, table)).map((r) => r.metric), ["before"]);
    // Replaced by an updatable view that maps time/metric/value onto the other table.
    await sql.unsafe(`DROP TABLE ${table.qualified}`);
    await sql.unsafe(`CREATE VIEW ${table.qualified} AS
      SELECT time, note AS metric, score AS value FROM ${secret}`);
    await svc.publish(msg(app, { payload: { through_view: 1 } }, "after"));
    await svc.idle(2);
    const [r] = await sql.unsafe(`SELECT count(*)::int AS n FROM ${secret}`);
    assert.equal(r!.n, 1, "nothing was written into the table behind the view");
    assert.deepEqual(await allErrors(sql, schema), [[app, "invalid app", "after"]]);
    await sql.unsafe(`DROP VIEW ${table.qualified}`);
    await sql.unsafe(`DROP TABLE ${secret}`);
  },
});

Deno.test({
  name: "integers beyond 2^53 and out-of-range integers: refused before the insert, never rounded",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name]);
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, {
      serial: "BIGINT",
      tag: "VARCHAR(128)",
      cnt: "INTEGER",
      amount: "NUMERIC",
    }, { schema });
    const app = table.name;
    const m = (device: string, metadata: Record<string, unknown>) => msg(app, { metadata }, device);
    // Sent as JSON text, so the digits are exactly what a sender would write.
    const raw = (device: string, field: string, digits: string) =>
      `{"app_id":"${app}","data":{"time":${T0},"device":"${device}",` +
      `"metadata":{"${field}":${digits}},"payload":{"x":1}}}`;
    await svc.publish(raw("serial", "serial", "9007199254740993"));
    await svc.publish(raw("tag", "tag", "12345678901234567890"));
    await svc.publish(m("cnt-big", { cnt: 1e10 }));
    await svc.publish(m("cnt-round", { cnt: 3.7 }));
    await svc.publish(
      m("exact", { serial: 9007199254740991, tag: 9007199254740991, amount: 0.25 }),
    );
    // numeric takes a large measurement as the double it is.
    await svc.publish(m("avogadro", { amount: 6.022e23 }));
    await svc.idle(6);
    const rows = await sql.unsafe(
      `SELECT serial::text, tag, cnt, amount::text FROM ${table.qualified}
        ORDER BY cnt NULLS LAST, amount`,
    );
    assert.deepEqual(rows.map((r) => [r.serial, r.tag, r.cnt, r.amount]), [
      [null, null, 4, null], // PostgreSQL rounds a fraction into an integer column
      ["9007199254740991", "9007199254740991", null, "0.25"],
      [null, null, null, "602200000000000000000000"],
    ]);
    const inexact = (c: string, asString = true) =>
      `number beyond 2^53 cannot be stored exactly in column "${c}"` +
      (asString ? " (send it as a string)" : "");
    assert.deepEqual(
      await allErrors(sql, schema),
      [
        [app, inexact("serial", false), "serial"],
        [app, inexact("tag"), "tag"],
        [app, 'value out of range for column "cnt" (integer)', "cnt-big"],
      ].sort((a, b) => a[1]! < b[1]! ? -1 : a[1]! > b[1]! ? 1 : 0),
    );
  },
});

Deno.test({
  name: "a lone message cancelled by statement_timeout for a while (a lock wait) still lands",
  ...npmSockets,
  async fn() {
    let table: AppTable | null = null;
    await using s = await setup(() => [table!.name, `${table!.name}_gate`], {
      writerTimings: { loneCancelWaitMs: 20_000 },
    });
    const { sql, schema, svc } = s;
    table = await createAppTable(sql, {}, { schema });
    const gate = `${ident(schema)}.${ident(`${table.name}_gate`)}`;
    await sql.unsafe(`CREATE TABLE ${gate} (x int)`);
    await sql.unsafe(`INSERT INTO ${gate} VALUES (1)`);
    await failLargeInserts(sql, table, "57014", 0, gate);
    await svc.publish(msg(table.name, { payload: { a: 1 } }, "waits"));
    await waitFor(() => svc.received >= 1, 10_000, "received");
    await new Promise((r) => setTimeout(r, 1500)); // cancelled twice or so meanwhile
    await sql.unsafe(`DELETE FROM ${gate}`); // the "lock" is released
    await svc.idle(1, 30_000);
    assert.deepEqual((await readRows(sql, table)).map((r) => r.value), [1]);
    assert.deepEqual(await allErrors(sql, schema), []);
    await sql.unsafe(`DROP TABLE ${gate}`);
  },
});

Deno.test({
  name: "an integer value column: out-of-range and beyond-2^53 numbers are refused up front",
  ...npmSockets,
  async fn() {
    await using s = await setup();
    const { sql, schema, svc } = s;
    const name = `app_${crypto.randomUUID().slice(0, 8)}`;
    const qualified = `${ident(schema)}.${ident(name)}`;
    await sql.unsafe(`CREATE TABLE ${qualified} (time TIMESTAMPTZ NOT NULL,
      metric VARCHAR(128) NOT NULL, value BIGINT NOT NULL, small SMALLINT)`);
    await svc.publish(msg(name, { payload: { ok: 7, flag: true } }, "ok"));
    await svc.publish(
      `{"app_id":"${name}","data":{"time":${T0},"device":"big","payload":{"v":9007199254740993}}}`,
    );
    await svc.publish(msg(name, { metadata: { small: 40000 } }, "range"));
    await svc.idle(3);
    const rows = await sql.unsafe(`SELECT metric, value::text FROM ${qualified} ORDER BY metric`);
    assert.deepEqual(rows.map((r) => [r.metric, r.value]), [["flag", "1"], ["ok", "7"]]);
    assert.deepEqual(await allErrors(sql, schema), [
      [name, 'number beyond 2^53 cannot be stored exactly in column "value"', "big"],
      [name, 'value out of range for column "small" (smallint)', "range"],
    ]);
    await sql.unsafe(`DROP TABLE ${qualified}`);
  },
});
