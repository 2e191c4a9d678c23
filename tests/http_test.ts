/**
 * Health, readiness and metrics: the endpoint alone, then a real service
 * against a throwaway PostgreSQL and Mosquitto that are stopped and started
 * under it.
 */

import assert from "node:assert/strict";
import postgres from "postgres";
import { loadConfig } from "../lib/config.ts";
import { HttpBindError, startHttp } from "../lib/http.ts";
import { setLogLevel } from "../lib/log.ts";
import { MAX_REASON_LABELS, Metrics, reasonLabel } from "../lib/metrics.ts";
import { Reasons } from "../lib/rejection.ts";
import { type Service, startService } from "../lib/service.ts";
import { freePort, startMosquitto, startPostgres } from "./helpers/servers.ts";
import { get, parseMetrics, publishAll, publisher, reading, until } from "./helpers/ops.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false };

Deno.test("reasonLabel keeps user-facing reasons and folds generated text into families", () => {
  const cases: [string, string][] = [
    [Reasons.invalidApp, "invalid app"],
    [Reasons.emptyPayload, "assertion failure: received empty payload (no metrics)"],
    ["invalid JSON", "invalid JSON"],
    ['string metric "time" is reserved', 'string metric "…" is reserved'],
    ['metadata key "a\\"b" is reserved', 'metadata key "…" is reserved'],
    [
      'value too long for column "site" (max 128 characters)',
      'value too long for column "…" (max N characters)',
    ],
    ["message too large (300000 bytes, limit 262144)", "message too large (N bytes, limit N)"],
    [
      "app_id is 70 bytes long (PostgreSQL allows 63)",
      "app_id is N bytes long (PostgreSQL allows N)",
    ],
    [
      'database rejected the row: new row violates check constraint "c" (SQLSTATE 23514)',
      "database rejected the row",
    ],
  ];
  for (const [reason, label] of cases) assert.equal(reasonLabel(reason), label, reason);
});

Deno.test("reasonLabel keeps the 8 of UTF-8 and still folds other numbers", () => {
  const cases: [string, string][] = [
    ["message is not valid UTF-8", "message is not valid UTF-8"],
    ["UTF-8 text of 70 bytes (limit 63)", "UTF-8 text of N bytes (limit N)"],
    ["message nested too deeply (limit 32)", "message nested too deeply (limit N)"],
  ];
  for (const [reason, label] of cases) assert.equal(reasonLabel(reason), label, reason);
});

Deno.test("rejected reasons beyond the label limit are counted as other", async () => {
  const m = new Metrics();
  for (let i = 0; i < MAX_REASON_LABELS + 5; i++) m.writer.rejected(`reason ${"x".repeat(i)}`);
  m.writer.rejected("invalid JSON"); // a new label once the limit is reached: other
  const samples = parseMetrics((await m.render()).body);
  const labels = [...samples.keys()].filter((k) => k.startsWith("sif_messages_rejected_total{"));
  assert.equal(labels.length, MAX_REASON_LABELS + 1);
  assert.equal(samples.get('sif_messages_rejected_total{reason="other"}'), 6);
});

Deno.test({
  name: "startHttp: status codes, no-store, content types; a taken port names the settings",
  ...npmSockets,
  fn: async () => {
    setLogLevel("error");
    let ready = false;
    const server = startHttp("127.0.0.1", 0, {
      ready: () => ({ ready, checks: { mqtt: ready, database: true } }),
      metrics: () => Promise.resolve({ contentType: "text/plain; version=0.0.4", body: "x 1\n" }),
    });
    try {
      const health = await get(server.port, "/healthz");
      assert.deepEqual([health.status, JSON.parse(health.body)], [200, { status: "ok" }]);
      assert.equal(health.headers.get("cache-control"), "no-store");
      const notReady = await get(server.port, "/readyz");
      assert.deepEqual([notReady.status, JSON.parse(notReady.body)], [503, {
        ready: false,
        mqtt: false,
        database: true,
      }]);
      ready = true;
      assert.equal((await get(server.port, "/readyz")).status, 200);
      const metrics = await get(server.port, "/metrics");
      assert.deepEqual([metrics.status, metrics.body], [200, "x 1\n"]);
      assert.equal(metrics.headers.get("content-type"), "text/plain; version=0.0.4");
      assert.equal(metrics.headers.get("cache-control"), "no-store");
      assert.equal((await get(server.port, "/")).status, 404);
      const post = await fetch(`http://127.0.0.1:${server.port}/readyz`, { method: "POST" });
      await post.body?.cancel();
      assert.deepEqual([post.status, post.headers.get("allow")], [405, "GET, HEAD"]);

      assert.throws(
        () =>
          startHttp("127.0.0.1", server.port, {
            ready: () => ({ ready, checks: {} }),
            metrics: () => Promise.resolve({ contentType: "", body: "" }),
          }),
        (e: unknown) =>
          e instanceof HttpBindError &&
          e.message.startsWith(`cannot listen on 127.0.0.1:${server.port} (HTTP_HOST, HTTP_PORT`),
      );
    } finally {
      await server.close();
    }
  },
});

Deno.test({
  name: "service: /metrics counts match what was sent; readiness follows database and broker",
  ...npmSockets,
  fn: async () => {
    const [pg, broker] = await Promise.all([startPostgres(), startMosquitto()]);
    const stateDir = await Deno.makeTempDir({ prefix: "sif-http-" });
    const admin = postgres({
      host: pg.host,
      port: pg.port,
      user: "postgres",
      database: "postgres",
      max: 1,
      onnotice: () => {},
    });
    let service: Service | null = null;
    const pub = await publisher(broker.url, { reconnectPeriod: 500 });
    try {
      await admin.unsafe(`CREATE TABLE readings (time TIMESTAMPTZ NOT NULL,
        metric VARCHAR(128) NOT NULL, value DOUBLE PRECISION NOT NULL, label VARCHAR(128))`);
      const port = freePort();
      const config = loadConfig({
        ENV: "DEVELOPMENT",
        INGEST_STREAM: broker.url,
        TS_HOST: pg.host,
        TS_PORT: String(pg.port),
        TS_USER: "postgres",
        TS_DATABASE: "postgres",
        STATE_DIR: stateDir,
        MQTT_CLIENT_ID: "sif-test-http",
        BATCH_MAX_WAIT_MS: "5",
        AUTO_CREATE_TABLES: "false",
        HTTP_PORT: String(port),
        LOG_LEVEL: "error",
      });
      setLogLevel(config.logLevel);
      service = startService(config);
      const scrape = async () => parseMetrics((await get(port, "/metrics")).body);
      const readyz = async () => {
        const r = await get(port, "/readyz");
        return { status: r.status, ...JSON.parse(r.body) };
      };
      await until(async () => (await readyz()).status === 200, 15_000, "ready at start");
      assert.deepEqual(await readyz(), { status: 200, ready: true, mqtt: true, database: true });

      // 10 stored (2 rows each), 3 bad JSON, 2 unknown app, 1 reserved string metric.
      const good = Array.from({ length: 10 }, (_, i) =>
        JSON.stringify({
          app_id: "readings",
          data: { time: 1700000000 + i, payload: { a: i, b: true } },
        }));
      const bad = [
        "{not json",
        "[1,",
        "",
        reading(1).replace('"readings"', '"no_such_app"'),
        reading(2).replace('"readings"', '"no_such_app"'),
        JSON.stringify({ app_id: "readings", data: { time: 1, payload: { time: "x" } } }),
      ];
      await publishAll(pub, "ingest/stream/0", [...good, ...bad]);
      const sent = good.length + bad.length;
      await until(
        async () => {
          const m = await scrape();
          return m.get("sif_messages_stored_total") === 10 && m.get("sif_spool_messages") === 0;
        },
        15_000,
        "all written",
      );
      const m = await scrape();
      const expected: Record<string, number> = {
        "sif_messages_received_total": sent,
        "sif_messages_acknowledged_total": sent,
        "sif_messages_stored_total": 10,
        "sif_rows_written_total": 20,
        'sif_messages_rejected_total{reason="invalid JSON"}': 3,
        'sif_messages_rejected_total{reason="invalid app"}': 2,
        'sif_messages_rejected_total{reason="string metric \\"…\\" is reserved"}': 1,
        "sif_spool_messages": 0,
        "sif_spool_bytes": 0,
        "sif_spool_oldest_age_seconds": 0,
        "sif_mqtt_connected": 1,
        "sif_mqtt_reconnects_total": 0,
        "sif_database_up": 1,
        'sif_build_info{version="0.1.0"}': 1,
      };
      for (const [k, v] of Object.entries(expected)) assert.equal(m.get(k), v, k);
      const batches = m.get("sif_batch_duration_seconds_count")!;
      assert.ok(batches >= 1 && batches <= sent, `batches ${batches}`);
      assert.equal(m.get('sif_batch_duration_seconds_bucket{le="+Inf"}'), batches);
      const counted = await admin<{ n: number }[]>`SELECT count(*)::int AS n FROM readings`;
      assert.equal(counted[0]?.n, 20);

      // Database away: the idle check notices within its 5 s period.
      await pg.stop();
      await until(async () => (await readyz()).status === 503, 15_000, "not ready without db");
      assert.deepEqual(await readyz(), { status: 503, ready: false, mqtt: true, database: false });
      assert.equal((await get(port, "/healthz")).status, 200);
      assert.equal((await scrape()).get("sif_database_up"), 0);
      // Messages are still acknowledged into the spool, and its depth and age show.
      await publishAll(pub, "ingest/stream/1", good.slice(0, 5));
      await until(
        async () => (await scrape()).get("sif_spool_messages") === 5,
        10_000,
        "5 spooled",
      );
      await new Promise((r) => setTimeout(r, 1100));
      const waiting = await scrape();
      assert.equal(waiting.get("sif_messages_acknowledged_total"), sent + 5);
      assert.ok(waiting.get("sif_spool_bytes")! > 5 * good[0]!.length, "spool bytes");
      assert.ok(waiting.get("sif_spool_oldest_age_seconds")! >= 1, "oldest age");

      await pg.start();
      await until(async () => (await readyz()).status === 200, 30_000, "ready with db back");
      await until(async () => (await scrape()).get("sif_spool_messages") === 0, 15_000, "drained");
      const after = await scrape();
      assert.equal(after.get("sif_messages_stored_total"), 15);
      assert.equal(after.get("sif_rows_written_total"), 30);
      assert.equal(after.get("sif_database_up"), 1);

      // Broker away and back.
      await broker.stop();
      await until(async () => (await readyz()).status === 503, 10_000, "not ready without broker");
      assert.deepEqual(await readyz(), { status: 503, ready: false, mqtt: false, database: true });
      assert.equal((await scrape()).get("sif_mqtt_connected"), 0);
      await broker.start();
      await until(async () => (await readyz()).status === 200, 30_000, "ready with broker back");
      const end = await scrape();
      assert.equal(end.get("sif_mqtt_connected"), 1);
      assert.equal(end.get("sif_mqtt_reconnects_total"), 1);

      // Stopping: not ready any more, then the port is closed.
      const stopping = service.stop(5000);
      assert.equal((await readyz().catch(() => ({ status: 0 }))).status !== 200, true);
      await stopping;
      await assert.rejects(fetch(`http://127.0.0.1:${port}/healthz`));
    } finally {
      await service?.stop(5000);
      await pub.endAsync(true);
      await admin.end({ timeout: 1 });
      await Promise.all([pg.destroy(), broker.destroy()]);
      await Deno.remove(stateDir, { recursive: true }).catch(() => {});
    }
  },
});
