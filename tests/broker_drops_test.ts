/**
 * Drops at the broker: Mosquitto discards QoS 1 messages beyond a client's
 * `max_queued_messages` and still acknowledges them to the publisher. The
 * service watches Mosquitto's `$SYS` count and reports what it sees grow.
 */

import assert from "node:assert/strict";
import mqtt from "mqtt";
import { DropCounter, DROPPED_TOPIC } from "../lib/brokerdrops.ts";
import { parseMetrics } from "./helpers/ops.ts";
import { startMosquitto } from "./helpers/servers.ts";
import { npmSockets, startTestService, waitFor } from "./helpers/service.ts";

const bytes = (s: string) => new TextEncoder().encode(s);

Deno.test("DropCounter: the first reading is a baseline; growth, restarts and junk", () => {
  const c = new DropCounter();
  assert.deepEqual(c.observe(bytes("7")), { kind: "first", total: 7 });
  assert.deepEqual(c.observe(bytes("7")), { kind: "same" });
  assert.deepEqual(c.observe(bytes("10")), { kind: "new", dropped: 3, total: 10 });
  // The broker restarted: its count starts again from zero.
  assert.deepEqual(c.observe(bytes("2")), { kind: "new", dropped: 2, total: 2 });
  assert.deepEqual(c.observe(bytes("0")), { kind: "same" });
  for (const junk of ["", "-1", "1.5", "1e3", "x", "9".repeat(16)]) {
    assert.deepEqual(c.observe(bytes(junk)), { kind: "invalid" }, junk);
  }
  assert.deepEqual(c.observe(bytes("1\n")), { kind: "new", dropped: 1, total: 1 });
});

Deno.test({
  name: "broker drops: a full queue at Mosquitto shows in sif_broker_dropped_messages_total",
  ...npmSockets,
  async fn() {
    // A queue of 5 per client, $SYS published every second.
    const broker = await startMosquitto({ extraConfig: "max_queued_messages 5\nsys_interval 1" });
    try {
      await using svc = await startTestService({ env: { INGEST_STREAM: broker.url } });
      const dropped = async () =>
        parseMetrics((await svc.service.metrics.render()).body).get(
          "sif_broker_dropped_messages_total",
        );
      assert.equal(await dropped(), 0);

      // Another subscriber with a persistent session goes away; 20 messages for it.
      const away = await mqtt.connectAsync(broker.url, {
        clientId: "away",
        clean: false,
        protocolVersion: 4,
      });
      await away.subscribeAsync("elsewhere/#", { qos: 1 });
      await away.endAsync();
      const pub = await mqtt.connectAsync(broker.url, { protocolVersion: 4 });
      for (let i = 0; i < 20; i++) await pub.publishAsync("elsewhere/x", `${i}`, { qos: 1 });
      await pub.endAsync();

      // Mosquitto kept 5 and dropped 15; the service saw the count grow by 15.
      await waitFor(async () => (await dropped()) === 15, 10_000, "15 drops reported");
      assert.match(await broker.log(), /Outgoing messages are being dropped for client away/);
      // The $SYS message itself is not ingested.
      assert.equal(svc.received, 0);
      assert.equal(svc.service.spool.count, 0);

      // The service's own stream is unaffected.
      const own = await mqtt.connectAsync(broker.url, { protocolVersion: 4 });
      await own.publishAsync(svc.topic(), JSON.stringify({ app_id: "no_such_app", data: {} }), {
        qos: 1,
      });
      await own.endAsync();
      await svc.idle(1);
      assert.equal(await dropped(), 15);
      assert.ok(DROPPED_TOPIC.startsWith("$SYS/"));
    } finally {
      await broker.destroy();
    }
  },
});
