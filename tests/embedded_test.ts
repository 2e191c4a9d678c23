/**
 * Development on a bare machine (lib/embedded.ts): the embedded PostgreSQL (PGlite over
 * TCP) runs what the service runs and serves several clients without mixing their
 * sessions; the service starts embedded parts only where nothing is configured or
 * running; and, as a subprocess with no .env and nothing set, it comes up embedded,
 * ingests, and keeps the data across a restart.
 *
 * The machine's own Mosquitto (1883) and PostgreSQL (5432) cannot be stopped, so the
 * "default" addresses are moved to spare ports with DEV_MQTT_PORT and TS_PORT (both only
 * shape the development defaults; INGEST_STREAM and TS_HOST stay unset). Everything else
 * in the service's environment is unset.
 */

import assert from "node:assert/strict";
import { createServer } from "node:net";
import mqtt from "mqtt";
import postgres from "postgres";
import { loadConfig } from "../lib/config.ts";
import { connect } from "../lib/db.ts";
import { answers, startBroker, startDatabase, startEmbedded } from "../lib/embedded.ts";
import { Provisioner } from "../lib/provision.ts";
import { RejectStore } from "../lib/rejects.ts";
import { SchemaCache } from "../lib/schema.ts";
import { buildInsert, translate } from "../lib/translate.ts";
import { parseMessage } from "../lib/ir.ts";
import { DEMO_ERROR, runDemo } from "../tools/demo.ts";
import { ServiceProcess } from "./helpers/process.ts";
import { npmSockets, waitFor } from "./helpers/service.ts";

/**
 * A TCP port nothing listens on right now, below the ephemeral range (32768+): a port
 * that was some client's ephemeral port can sit in TIME-WAIT and refuse a listener, which
 * the real defaults (1883, 5432) never do.
 */
async function sparePort(): Promise<number> {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (await answers("127.0.0.1", port)) continue;
    const server = createServer();
    const ok = await new Promise<boolean>((done) => {
      server.once("error", () => done(false));
      server.listen(port, "127.0.0.1", () => done(true));
    });
    if (!ok) continue;
    await new Promise<void>((done) => server.close(() => done()));
    return port;
  }
}

/** A client of the embedded database as the tests use it (any client, not the service). */
function client(port: number, max = 1): postgres.Sql {
  return postgres({
    host: "127.0.0.1",
    port,
    user: "postgres",
    database: "postgres",
    max,
    onnotice: () => {},
    connect_timeout: 10,
  });
}

Deno.test({
  name: "embedded broker: no MQTT 5; MQTT 3.1.1 keeps a clean:false session and QoS 1 queue",
  ...npmSockets,
  async fn() {
    const port = await sparePort();
    const broker = await startBroker("localhost", port);
    const url = `mqtt://localhost:${port}`;
    try {
      // What the service asks for by default: refused, so it asks aedes for 3.1.1.
      const v5 = mqtt.connect(url, {
        protocolVersion: 5,
        clean: false,
        clientId: "v5",
        properties: { sessionExpiryInterval: 60 },
        reconnectPeriod: 0,
      });
      const refused = await new Promise<string>((done) => {
        v5.on("error", (e) => done(e.message));
        v5.on("connect", () => done("connected"));
      });
      v5.end(true);
      assert.equal(refused, "Connection refused: Unacceptable protocol version");

      const opts = {
        protocolVersion: 4 as const,
        clean: false,
        clientId: "svc",
        reconnectPeriod: 0,
      };
      const sub = await mqtt.connectAsync(url, opts);
      await sub.subscribeAsync("ingest/stream/#", { qos: 1 });
      await sub.endAsync();
      const pub = await mqtt.connectAsync(url, { protocolVersion: 4, reconnectPeriod: 0 });
      for (const n of ["1", "2", "3"]) await pub.publishAsync("ingest/stream/0", n, { qos: 1 });
      await pub.endAsync();
      const got: string[] = [];
      const again = mqtt.connect(url, opts);
      again.on("message", (_t, p) => got.push(String(p)));
      const present = await new Promise<boolean>((done) =>
        again.on("connect", (c) => done(c.sessionPresent))
      );
      assert.equal(present, true);
      await waitFor(() => got.length === 3, 5000, "queued messages");
      assert.deepEqual(got, ["1", "2", "3"]);
      await again.endAsync();
    } finally {
      await broker.stop();
    }
  },
});

Deno.test({
  name: "embedded PostgreSQL: the service's statements and startup settings work on PGlite",
  ...npmSockets,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "sif-pglite-" });
    const port = await sparePort();
    const pg = await startDatabase(`${dir}/pgdata`, "127.0.0.1", port);
    const cfg = loadConfig({ TS_PORT: String(port), STATE_DIR: dir });
    const sql = connect({ ...cfg.db, poolSize: 1 });
    try {
      // lib/db.ts asks for these in the startup packet; PGlite ignores startup
      // parameters, so the embedded server sets them on its one session.
      const [s] = await sql`SELECT current_setting('search_path') AS sp,
        current_setting('TimeZone') AS tz`;
      assert.deepEqual({ ...s }, { sp: "pg_catalog", tz: "UTC" });

      const rejects = new RejectStore("public", "test/1");
      await rejects.ensureTables(sql);
      await rejects.ensureTables(sql); // CREATE TABLE IF NOT EXISTS, twice
      const msg = (json: unknown) => {
        const p = parseMessage(new TextEncoder().encode(JSON.stringify(json)));
        if (!p.ok) throw new Error(p.rejection.reason);
        return p.message;
      };
      const m = msg({
        app_id: "pgl_app",
        data: {
          time: 1700000000.25,
          metadata: { site: "roof", floor: 3 },
          payload: { t: 21.5, on: true, status: "ok" },
        },
      });
      assert.deepEqual(await new Provisioner(sql, "public").ensureTable(m), {
        ok: true,
        created: true,
        timescale: false,
      });
      const t = translate(m, await new SchemaCache(sql, "public").get("pgl_app"));
      assert.ok(t.ok);
      await sql.begin(async (tx) => {
        for (const g of t.groups) {
          const stmt = buildInsert(g);
          await tx.unsafe(stmt.text, stmt.values as never[], { prepare: true });
        }
        await rejects.record(tx, [{
          rejection: { reason: "invalid app", appId: "nope", device: "d" },
          topic: "ingest/stream/0",
          payload: new Uint8Array([1, 2]),
          receivedAt: 1700000000000,
          seq: 1,
        }]);
      });
      // The upsert's ON CONFLICT path, through unnest($1::text[], ...).
      await rejects.record(sql, [{
        rejection: { reason: "invalid app", appId: "nope", device: "d" },
        topic: "ingest/stream/0",
        payload: new Uint8Array([1, 2]),
        receivedAt: 1700000000000,
        seq: 1,
      }]);
      const rows = await sql.unsafe(
        `SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') AS time,
                metric, value, site, floor, status FROM public.pgl_app ORDER BY metric`,
      );
      assert.deepEqual(rows.map((r) => ({ ...r })), [
        {
          time: "2023-11-14T22:13:20.250000",
          metric: "on",
          value: 1,
          site: "roof",
          floor: 3,
          status: null,
        },
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
          metric: "t",
          value: 21.5,
          site: "roof",
          floor: 3,
          status: null,
        },
      ]);
      const errors = await sql`SELECT app_id, error, device FROM public."errorTable"`;
      assert.deepEqual(errors.map((r) => ({ ...r })), [{
        app_id: "nope",
        error: "invalid app",
        device: "d",
      }]);
      const [dl] = await sql`SELECT count(*)::int AS n FROM public.sif_dead_letter`;
      assert.equal(dl!.n, 1);
    } finally {
      await sql.end({ timeout: 5 });
      await pg.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "embedded PostgreSQL: concurrent clients never see each other's statements or transactions",
  ...npmSockets,
  async fn() {
    // pglite-socket's own queue interleaves clients message by message: with two clients
    // running unnamed extended-protocol queries, ~10% failed with 'portal "" does not
    // exist' or got the other client's result. lib/embedded.ts replaces that queue.
    const dir = await Deno.makeTempDir({ prefix: "sif-pglite-" });
    const port = await sparePort();
    const pg = await startDatabase(`${dir}/pgdata`, "127.0.0.1", port);
    const a = client(port), b = client(port), c = client(port);
    try {
      await a.unsafe("CREATE TABLE public.pairs (n int NOT NULL)");
      const errors: string[] = [];
      let wrong = 0;
      const numbers = async () => {
        for (let i = 0; i < 200; i++) {
          const r = await a.unsafe("SELECT $1::int + 1 AS x", [i]).catch((e) => {
            errors.push(e.message);
            return [];
          });
          if (r[0]?.x !== i + 1) wrong++;
        }
      };
      const texts = async () => {
        for (let i = 0; i < 200; i++) {
          const r = await b.unsafe("SELECT $1::text || 'b' AS y", [String(i)]).catch((e) => {
            errors.push(e.message);
            return [];
          });
          if (r[0]?.y !== `${i}b`) wrong++;
        }
      };
      // Transactions of two rows each: another client never sees half of one.
      const pairs = async () => {
        for (let i = 0; i < 40; i++) {
          await c.begin(async (tx) => {
            await tx.unsafe("INSERT INTO public.pairs VALUES ($1)", [i]);
            await tx.unsafe("INSERT INTO public.pairs VALUES ($1)", [i]);
          }).catch((e) => errors.push(e.message));
        }
      };
      const halves = async () => {
        for (let i = 0; i < 60; i++) {
          const [r] = await b.unsafe("SELECT count(*)::int AS n FROM public.pairs");
          if (r!.n % 2 !== 0) wrong++;
        }
      };
      await Promise.all([numbers(), texts(), pairs(), halves()]);
      assert.deepEqual(errors, []);
      assert.equal(wrong, 0);
      const [n] = await a.unsafe("SELECT count(*)::int AS n FROM public.pairs");
      assert.equal(n!.n, 80);

      // A client that leaves inside a transaction does not block the others; its work is undone.
      const d = client(port);
      await d.unsafe("BEGIN");
      await d.unsafe("INSERT INTO public.pairs VALUES (1000)");
      await d.end({ timeout: 0 });
      const [after] = await waitFor(
        () => a.unsafe("SELECT count(*)::int AS n FROM public.pairs").catch(() => null),
        10_000,
        "the session to be free again",
      );
      assert.equal(after!.n, 80);
    } finally {
      await Promise.all([a, b, c].map((s) => s.end({ timeout: 5 })));
      await pg.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "startEmbedded(): nothing in PRODUCTION, nothing where configured or already running",
  ...npmSockets,
  async fn() {
    const production = loadConfig({
      ENV: "PRODUCTION",
      INGEST_STREAM: "127.0.0.1:1883",
      TS_HOST: "127.0.0.1",
      TS_USER: "postgres",
      TS_DATABASE: "postgres",
      PGSSLMODE: "disable",
      STATE_DIR: "/tmp",
    });
    const p = await startEmbedded(production);
    assert.deepEqual(p.running, []);
    assert.equal(p.config, production);

    // Development, addresses unset, but the machine's Mosquitto and PostgreSQL answer on
    // the default ports: they are used, nothing is embedded, MQTT stays version 5.
    assert.ok(await answers("localhost", 1883) && await answers("127.0.0.1", 5432));
    const local = loadConfig({ STATE_DIR: "/nonexistent" });
    assert.equal(local.mqtt.explicit, false);
    assert.equal(local.db.explicit, false);
    const l = await startEmbedded(local);
    assert.deepEqual(l.running, []);
    assert.equal(l.config.mqtt.protocolVersion, 5);
    assert.equal(l.config.db.poolSize, undefined);

    // Configured addresses are never replaced, even when nothing answers there.
    const port = await sparePort();
    const explicit = loadConfig({
      INGEST_STREAM: `127.0.0.1:${port}`,
      TS_HOST: "127.0.0.1",
      TS_PORT: String(port),
      STATE_DIR: "/nonexistent",
    });
    const e = await startEmbedded(explicit);
    assert.deepEqual(e.running, []);
    assert.equal(e.config, explicit);
  },
});

Deno.test({
  name: "bare machine: no .env, nothing set: comes up embedded, ingests, keeps data on restart",
  ...npmSockets,
  async fn() {
    const mqttPort = await sparePort();
    const pgPort = await sparePort();
    assert.equal(await answers("localhost", mqttPort), false);
    assert.equal(await answers("127.0.0.1", pgPort), false);
    const stateDir = await Deno.makeTempDir({ prefix: "sif-bare-" });
    // ServiceProcess fills in addresses for its usual tests; "" is how config reads unset.
    const unset = Object.fromEntries(
      [
        "ENV",
        "INGEST_STREAM",
        "TS_HOST",
        "TS_USER",
        "TS_DATABASE",
        "PGSSLMODE",
        "AUTO_CREATE_TABLES",
        "MQTT_CLIENT_ID",
      ].map((k) => [k, ""]),
    );
    const start = () =>
      ServiceProcess.start({
        db: { host: "", port: pgPort, user: "", database: "" },
        brokerUrl: "",
        stateDir,
        clientId: "",
        env: { ...unset, DEV_MQTT_PORT: String(mqttPort), TS_PORT: String(pgPort) },
      });
    let svc = start();
    let sql: postgres.Sql | null = null;
    try {
      await svc.waitForLog("subscribed", 90_000);
      const broker = svc.find("embedded MQTT broker running (development only)")[0];
      assert.equal(broker?.address, `localhost:${mqttPort}`);
      const db = svc.find("embedded PostgreSQL running (development only)")[0];
      assert.equal(db?.address, `127.0.0.1:${pgPort}`);
      assert.equal(db?.data_dir, `${stateDir}/pgdata`);
      assert.equal(svc.find((l) => l.msg === "starting")[0]?.env_file, null);

      const pub = await mqtt.connectAsync(`mqtt://localhost:${mqttPort}`, {
        protocolVersion: 4,
        reconnectPeriod: 0,
      });
      await pub.publishAsync(
        "ingest/stream/0",
        JSON.stringify({
          app_id: "bare_weather",
          data: {
            time: 1700000000.25,
            device: "station-7",
            metadata: { site: "roof" },
            payload: { temperature: 21.5, status: "ok" },
          },
        }),
        { qos: 1 },
      );
      await pub.publishAsync(
        "ingest/stream/1",
        JSON.stringify({ app_id: "bare_weather", data: { time: 1, payload: { t: { x: 1 } } } }),
        { qos: 1 },
      );
      await pub.endAsync();

      sql = client(pgPort);
      const read = () =>
        sql!.unsafe(
          `SELECT metric, value, site, status FROM public.bare_weather ORDER BY metric`,
        ).then((r) => r.map((x) => ({ ...x }))).catch(() => []);
      const expected = [
        { metric: "status", value: 0, site: "roof", status: "ok" },
        { metric: "temperature", value: 21.5, site: "roof", status: null },
      ];
      assert.deepEqual(
        await waitFor(async () => (await read()).length === 2 && read(), 20_000),
        expected,
      );
      const errors = await waitFor(
        async () => {
          const r = await sql!`SELECT app_id, error FROM public."errorTable"`;
          return r.length > 0 ? r.map((x) => ({ ...x })) : null;
        },
        10_000,
      );
      assert.deepEqual(errors, [
        { app_id: "bare_weather", error: "unexpected object (expected primitive)" },
      ]);
      await sql.end({ timeout: 5 });
      sql = null;

      // `deno task demo` with the same (empty) settings: every row and the error arrive.
      const printed: string[] = [];
      const demo = await runDemo(
        loadConfig({ DEV_MQTT_PORT: String(mqttPort), TS_PORT: String(pgPort) }),
        (line) => printed.push(line),
      );
      assert.ok(demo.complete, printed.join("\n"));
      assert.deepEqual(
        Object.fromEntries(Object.entries(demo.tables).map(([t, rows]) => [t, rows.length])),
        { demo_weather: 18, demo_power: 12, demo_garden: 3 },
      );
      assert.deepEqual(demo.errors.filter((e) => e.app_id !== "bare_weather"), [
        { app_id: "demo_weather", device: "station-9", error: DEMO_ERROR },
      ]);
      assert.ok(printed.includes('public."errorTable" (refreshed by this run):'));

      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
      assert.equal(await answers("127.0.0.1", pgPort), false, "embedded PostgreSQL stopped");

      // Restarted on the same state folder: the rows are still there.
      svc = start();
      await svc.waitForLog("subscribed", 90_000);
      sql = client(pgPort);
      assert.deepEqual(await read(), expected);
      assert.deepEqual(await svc.stop(), { code: 0, signal: null });
    } finally {
      await sql?.end({ timeout: 5 });
      if (svc.running) await svc.kill();
      await Deno.remove(stateDir, { recursive: true }).catch(() => {});
    }
  },
});
