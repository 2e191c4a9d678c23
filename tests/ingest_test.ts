/**
 * End to end through the real Mosquitto and PostgreSQL: IR messages published over MQTT
 * (QoS 1) are read back from the database with exact values, and bad messages land in
 * "errorTable" and sif_dead_letter with the exact SPEC strings.
 */

import assert from "node:assert/strict";
import {
  countRows,
  createAppTable,
  db,
  deadLetters,
  errorRows,
  npmSockets,
  readRows,
  sortedTuples,
  startTestService,
  uid,
  waitFor,
} from "./helpers/service.ts";

const T0 = 1700000000.25; // 2023-11-14T22:13:20.250000Z
const T0_ISO = "2023-11-14T22:13:20.250000Z";

Deno.test({
  name: "SPEC example: 3 rows, string metric in its column, metadata in every row",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, {
      site: "VARCHAR(128)",
      floor: "DOUBLE PRECISION",
      status: "VARCHAR(128)",
    });
    await svc.publish({
      app_id: table.name,
      data: {
        time: T0,
        device: "station-7",
        metadata: { site: "roof", floor: 3 },
        payload: { temperature: 21.5, humidity: 40, status: "ok" },
      },
    });
    await svc.idle(1);
    assert.deepEqual(await readRows(sql, table), [
      { time: T0_ISO, metric: "humidity", value: 40, site: "roof", floor: 3, status: null },
      { time: T0_ISO, metric: "status", value: 0, site: "roof", floor: 3, status: "ok" },
      { time: T0_ISO, metric: "temperature", value: 21.5, site: "roof", floor: 3, status: null },
    ]);
    assert.deepEqual(await errorRows(sql, table.name), []);
  },
});

Deno.test({
  name: "booleans are stored as 1/0 and null metrics are skipped",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql);
    await svc.publish({
      app_id: table.name,
      data: { time: T0, payload: { on: true, off: false, gone: null, level: -2.5 } },
    });
    await svc.idle(1);
    assert.deepEqual(await readRows(sql, table), [
      { time: T0_ISO, metric: "level", value: -2.5 },
      { time: T0_ISO, metric: "off", value: 0 },
      { time: T0_ISO, metric: "on", value: 1 },
    ]);
  },
});

Deno.test({
  name: "a data array stores every reading with its own time and metadata",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, { site: "VARCHAR(128)", note: "VARCHAR(128)" });
    await svc.publish({
      app_id: table.name,
      data: [
        { time: T0, metadata: { site: "a" }, payload: { x: 1, y: 2 } },
        { time: T0 + 1, metadata: { site: "b" }, payload: { x: 3, note: "hi" } },
        { time: T0 + 2, payload: { x: 4 } },
      ],
    });
    await svc.idle(1);
    assert.deepEqual(await readRows(sql, table), [
      { time: T0_ISO, metric: "x", value: 1, site: "a", note: null },
      { time: T0_ISO, metric: "y", value: 2, site: "a", note: null },
      { time: "2023-11-14T22:13:21.250000Z", metric: "note", value: 0, site: "b", note: "hi" },
      { time: "2023-11-14T22:13:21.250000Z", metric: "x", value: 3, site: "b", note: null },
      { time: "2023-11-14T22:13:22.250000Z", metric: "x", value: 4, site: null, note: null },
    ]);
  },
});

Deno.test({
  name: "ISO times with and without offset; microsecond precision is kept",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql);
    const cases: [string, string | number, string][] = [
      ["a_no_offset", "2024-01-02T03:04:05", "2024-01-02T03:04:05.000000Z"],
      ["b_z", "2024-01-02T03:04:05Z", "2024-01-02T03:04:05.000000Z"],
      ["c_plus2", "2024-01-02T03:04:05+02:00", "2024-01-02T01:04:05.000000Z"],
      ["d_minus0530", "2024-01-02T03:04:05.5-05:30", "2024-01-02T08:34:05.500000Z"],
      ["e_space_micros", "2024-01-02 03:04:05.123456+0000", "2024-01-02T03:04:05.123456Z"],
      ["f_iso_micros", "2024-01-02T03:04:05.999999Z", "2024-01-02T03:04:05.999999Z"],
      ["g_num_micros", 1700000000.123456, "2023-11-14T22:13:20.123456Z"],
      ["h_num_one_micro", 1700000000.000001, "2023-11-14T22:13:20.000001Z"],
      ["i_num_whole", 1700000000, "2023-11-14T22:13:20.000000Z"],
    ];
    await svc.publishAll(
      cases.map(([metric, time]) => ({
        app_id: table.name,
        data: { time, payload: { [metric]: 1 } },
      })),
    );
    await svc.idle(cases.length);
    const rows = await readRows(sql, table);
    assert.deepEqual(
      rows.map((r) => [r.metric, r.time]).sort(),
      cases.map(([metric, , expected]) => [metric, expected]).sort(),
    );
    assert.deepEqual(await errorRows(sql, table.name), []);
  },
});

Deno.test({
  name: "a string metric named like a metadata key: the metric's string wins in its row",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, { status: "VARCHAR(128)", site: "VARCHAR(128)" });
    await svc.publish({
      app_id: table.name,
      data: {
        time: T0,
        metadata: { status: "from-metadata", site: "roof" },
        payload: { status: "from-payload", temp: 1 },
      },
    });
    await svc.idle(1);
    assert.deepEqual(await readRows(sql, table), [
      { time: T0_ISO, metric: "status", value: 0, status: "from-payload", site: "roof" },
      { time: T0_ISO, metric: "temp", value: 1, status: "from-metadata", site: "roof" },
    ]);
  },
});

Deno.test({
  name: "errors: exact SPEC strings in errorTable and the raw message in sif_dead_letter",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, {
      site: "VARCHAR(128)",
      floor: "DOUBLE PRECISION",
    });
    const app = table.name;
    const missing = `missing_${uid()}`;
    const data = (device: string, extra: Record<string, unknown>) => ({
      time: T0,
      device,
      payload: { temperature: 1 },
      ...extra,
    });
    // [device, message, expected error]; every message names our app except the first.
    const cases: [string, Record<string, unknown>, string, string][] = [
      ["d1", { app_id: missing, data: data("d1", {}) }, missing, "invalid app"],
      [
        "d2",
        { app_id: app, data: data("d2", { metadata: { nope: "x" } }) },
        app,
        "invalid metadata",
      ],
      [
        "d3",
        { app_id: app, data: data("d3", { payload: { nope: "str" } }) },
        app,
        "invalid metadata",
      ],
      [
        "d4",
        { app_id: app, data: data("d4", { metadata: { floor: "three" } }) },
        app,
        "unexpected string (expected number)",
      ],
      [
        "d5",
        { app_id: app, data: data("d5", { metadata: { floor: true } }) },
        app,
        "unexpected boolean (expected number)",
      ],
      [
        "d6",
        { app_id: app, data: data("d6", { payload: { temperature: { a: 1 } } }) },
        app,
        "unexpected object (expected primitive)",
      ],
      [
        "d7",
        { app_id: app, data: data("d7", { metadata: { site: ["roof"] } }) },
        app,
        "unexpected object (expected primitive)",
      ],
      [
        "d8",
        { app_id: app, data: data("d8", { payload: {} }) },
        app,
        "assertion failure: received empty payload (no metrics)",
      ],
      [
        "d9",
        { app_id: app, data: { time: T0, device: "d9" } },
        app,
        "assertion failure: received empty payload (no metrics)",
      ],
      [
        "", // an empty data array has no device to attribute the error to
        { app_id: app, data: [] },
        app,
        "assertion failure: received empty payload (no metrics)",
      ],
    ];
    const sent = await svc.publishAll(cases.map(([, msg]) => msg));
    await svc.idle(cases.length);

    // Every case in "errorTable", attributed to its app id (and device, where it is in the app).
    const mine = (await errorRows(sql, app)).map((r) => [r.error, r.device]);
    assert.deepEqual(
      mine,
      sortedTuples(cases.filter(([, , a]) => a === app).map(([d, , , e]) => [e, d])),
    );
    const invalidApp = await errorRows(sql, missing);
    assert.deepEqual(invalidApp.map((r) => [r.app_id, r.error]), [[missing, "invalid app"]]);

    // Every message dead-lettered with the exact bytes published, its topic and its error.
    const dead = await deadLetters(sql, svc.source);
    assert.equal(dead.length, cases.length);
    for (const [i, [, , appId, error]] of cases.entries()) {
      const d = dead[i]!;
      assert.deepEqual(d.payload, sent[i], `case ${i} payload`);
      assert.equal(d.topic, svc.topic());
      assert.equal(d.app_id, appId);
      assert.equal(d.error, error, `case ${i} error`);
    }
    assert.equal(await countRows(sql, table.qualified), 0);
  },
});

Deno.test({
  name: "the same error again refreshes its timestamp: one row, later time",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql);
    const bad = {
      app_id: table.name,
      data: { time: T0, device: "dev-1", metadata: { nope: 1 }, payload: { x: 1 } },
    };
    await svc.publish(bad);
    await svc.idle(1);
    const [first, ...more] = await errorRows(sql, table.name);
    assert.deepEqual(more, []);
    assert.equal(first!.error, "invalid metadata");
    assert.equal(first!.device, "dev-1");
    await new Promise((r) => setTimeout(r, 20)); // now() must move on
    await svc.publish(bad);
    await svc.idle(2);
    const after = await errorRows(sql, table.name);
    assert.equal(after.length, 1);
    assert.equal(after[0]!.error, "invalid metadata");
    assert.ok(
      after[0]!.timestamp.getTime() > first!.timestamp.getTime(),
      `${after[0]!.timestamp.toISOString()} > ${first!.timestamp.toISOString()}`,
    );
    // Both messages are kept as dead letters: the upsert only dedupes the user-facing row.
    assert.equal((await deadLetters(sql, svc.source)).length, 2);
  },
});

Deno.test({
  name: "a bad message does not affect the next good one (bad, good, bad, good)",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, { floor: "DOUBLE PRECISION" });
    const msg = (device: string, metadata: Record<string, unknown>, value: number) => ({
      app_id: table.name,
      data: { time: T0, device, metadata, payload: { [`m${value}`]: value } },
    });
    await svc.publishAll([
      msg("bad-1", { floor: "x" }, 1),
      msg("good-2", { floor: 2 }, 2),
      msg("bad-3", { nope: 3 }, 3),
      msg("good-4", { floor: 4 }, 4),
    ]);
    await svc.idle(4);
    assert.deepEqual(await readRows(sql, table), [
      { time: T0_ISO, metric: "m2", value: 2, floor: 2 },
      { time: T0_ISO, metric: "m4", value: 4, floor: 4 },
    ]);
    assert.deepEqual((await errorRows(sql, table.name)).map((r) => [r.error, r.device]), [
      ["invalid metadata", "bad-3"],
      ["unexpected string (expected number)", "bad-1"],
    ]);
  },
});

Deno.test({
  name: "a channel argument subscribes to ingest/stream/<channel> only",
  ...npmSockets,
  async fn() {
    await using sql = db();
    // loadConfig(env, ["0"]): the channel overrides MQTT_TOPIC.
    await using svc = await startTestService({ args: ["0"] });
    assert.equal(svc.config.mqtt.topic, "ingest/stream/0");
    await using zero = await createAppTable(sql);
    await using one = await createAppTable(sql);
    const msg = (app: string) => ({ app_id: app, data: { time: T0, payload: { x: 1 } } });
    // Channel 1 first: once channel 0's message is written, channel 1's would have been too.
    await svc.publish(msg(one.name), "ingest/stream/1");
    await svc.publish(msg(zero.name), "ingest/stream/0");
    await waitFor(async () => (await countRows(sql, zero.qualified)) === 1, 10_000, "channel 0");
    await waitFor(() => svc.service.spool.count === 0, 10_000, "spool drained");
    assert.deepEqual(await readRows(sql, zero), [{ time: T0_ISO, metric: "x", value: 1 }]);
    assert.equal(await countRows(sql, one.qualified), 0);
    assert.deepEqual(await errorRows(sql, one.name), []);
    assert.deepEqual((await deadLetters(sql, svc.source)).filter((d) => d.app_id === one.name), []);
  },
});

Deno.test({
  name: "stop() drains: 500 messages spooled behind a locked table are all written",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql);
    // Hold the table so the writer blocks on its first insert while messages pile up.
    let release = () => {};
    const released = new Promise<void>((r) => (release = r));
    let locked = () => {};
    const isLocked = new Promise<void>((r) => (locked = r));
    const holding = sql.begin(async (tx) => {
      await tx.unsafe(`LOCK TABLE ${table.qualified} IN ACCESS EXCLUSIVE MODE`);
      locked();
      await released;
    });
    try {
      await isLocked;
      const n = 500;
      await svc.publishAll(
        Array.from({ length: n }, (_, i) => ({
          app_id: table.name,
          data: { time: T0 + i, payload: { v: i } },
        })),
      );
      await waitFor(() => svc.received >= n, 15_000, `${n} messages received`);
      const pendingAtStop = svc.service.spool.count;
      assert.ok(pendingAtStop >= n - 1, `spool holds ${pendingAtStop} at stop`);
      const stopping = svc.stop(30_000);
      await new Promise((r) => setTimeout(r, 100));
      release();
      await holding;
      assert.deepEqual(await stopping, { drained: true, pending: 0 });
      const rows = await readRows(sql, table);
      assert.equal(rows.length, n);
      assert.deepEqual(rows.map((r) => r.value), Array.from({ length: n }, (_, i) => i));
    } finally {
      release();
      await holding.catch(() => {});
    }
  },
});

Deno.test({
  name: "metadata by column type: numbers and booleans into text, boolean and integer columns",
  ...npmSockets,
  async fn() {
    await using sql = db();
    await using svc = await startTestService();
    await using table = await createAppTable(sql, {
      label: "VARCHAR(128)",
      flag: "BOOLEAN",
      count: "INTEGER",
      ratio: "REAL",
      note: "TEXT",
    });
    const meta = (metadata: Record<string, unknown>, v: number) => ({
      app_id: table.name,
      data: { time: T0, device: `d${v}`, metadata, payload: { [`m${v}`]: v } },
    });
    await svc.publishAll([
      meta({ label: 3, flag: true, count: 42, ratio: 0.5, note: false }, 1),
      meta({ label: 1.25, flag: false, count: -7, ratio: -2, note: "x" }, 2),
      meta({ label: "t", flag: null, count: null, ratio: null, note: null }, 3),
      meta({ flag: "yes" }, 4),
      meta({ flag: 1 }, 5),
    ]);
    await svc.idle(5);
    assert.deepEqual(await readRows(sql, table), [
      {
        time: T0_ISO,
        metric: "m1",
        value: 1,
        label: "3",
        flag: true,
        count: 42,
        ratio: 0.5,
        note: "false",
      },
      {
        time: T0_ISO,
        metric: "m2",
        value: 2,
        label: "1.25",
        flag: false,
        count: -7,
        ratio: -2,
        note: "x",
      },
      {
        time: T0_ISO,
        metric: "m3",
        value: 3,
        label: "t",
        flag: null,
        count: null,
        ratio: null,
        note: null,
      },
    ]);
    assert.deepEqual((await errorRows(sql, table.name)).map((r) => [r.error, r.device]), [
      ["unexpected number (expected boolean)", "d5"],
      ["unexpected string (expected boolean)", "d4"],
    ]);
  },
});
