/**
 * Group commit of the spool (lib/spool.ts stage/commit/rollback) and the
 * PUBACKs that wait for it (lib/mqtt.ts GroupCommit): a message is never
 * acknowledged before the commit that makes it durable, and a failed commit
 * acknowledges nothing, so the broker sends those messages again.
 */

import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttConfig } from "../lib/config.ts";
import { MAX_GROUP, startMqtt } from "../lib/mqtt.ts";
import { Spool } from "../lib/spool.ts";
import { startMosquitto } from "./helpers/servers.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false } as const;
const bytes = (s: string) => new TextEncoder().encode(s);
const text = (b: Uint8Array) => new TextDecoder().decode(b);

Deno.test("Spool.stage() is invisible to read() and not durable until commit()", () => {
  const dir = Deno.makeTempDirSync({ prefix: "sif-group-" });
  try {
    const spool = Spool.open(dir);
    const a = spool.append("t", bytes("a"), 1);
    const b = spool.stage("t", bytes("b"), 2);
    const c = spool.stage("t", bytes("c"), 3);
    assert.deepEqual([b, c], [a + 1, a + 2]);
    assert.equal(spool.staged, 2);
    assert.equal(spool.count, 3);
    assert.deepEqual(spool.read(0, 10).map((e) => text(e.payload)), ["a"]);
    assert.equal(spool.commit(), 2);
    assert.equal(spool.commit(), 0);
    assert.deepEqual(spool.read(0, 10).map((e) => text(e.payload)), ["a", "b", "c"]);

    // Staged and never committed: gone after close, as if never received.
    spool.stage("t", bytes("d"), 4);
    spool.close();
    const again = Spool.open(dir);
    assert.deepEqual(again.read(0, 10).map((e) => e.seq), [a, b, c]);
    assert.equal(again.count, 3);
    again.close();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("Spool.rollback() drops staged messages and undoes deletes made meanwhile", () => {
  const dir = Deno.makeTempDirSync({ prefix: "sif-group-" });
  try {
    const spool = Spool.open(dir);
    const a = spool.append("t", bytes("a"), 1);
    const b = spool.append("t", bytes("bb"), 2);
    spool.stage("t", bytes("c"), 3);
    spool.deleteThrough(a); // the writer committed `a` while the group was open
    assert.equal(spool.count, 2);
    spool.rollback();
    assert.equal(spool.staged, 0);
    // The delete was part of the rolled-back transaction: `a` is back, `c` is gone.
    assert.deepEqual(spool.read(0, 10).map((e) => e.seq), [a, b]);
    assert.equal(spool.count, 2);
    assert.equal(spool.bytes, 1 + 2 + 2 * "t".length);
    // append() after a group commits the group with it.
    spool.stage("t", bytes("d"), 4);
    const e = spool.append("t", bytes("e"), 5);
    assert.equal(spool.staged, 0);
    assert.deepEqual(spool.read(b, 10).map((x) => [x.seq, text(x.payload)]), [
      [e - 1, "d"],
      [e, "e"],
    ]);
    spool.close();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

function mqttConfig(url: string, topic: string, clientId: string): MqttConfig {
  return {
    url,
    topic,
    clientId,
    username: undefined,
    password: undefined,
    ca: undefined,
    cert: undefined,
    key: undefined,
    shareGroup: undefined,
    explicit: true,
  };
}

/** Counts PUBACK packets in bytes written to the consumer's socket. */
function countPubacks(chunks: Uint8Array[], state: { rest: number[] }): number {
  const buf = [...state.rest];
  for (const c of chunks) for (const b of c) buf.push(b);
  let n = 0, i = 0;
  for (;;) {
    if (i + 2 > buf.length) break;
    let len = 0, mul = 1, j = i + 1;
    for (; j < buf.length; j++) {
      len += (buf[j]! & 0x7f) * mul;
      mul *= 128;
      if ((buf[j]! & 0x80) === 0) break;
    }
    if (j >= buf.length || j + 1 + len > buf.length) break;
    if (buf[i]! >> 4 === 4) n++;
    i = j + 1 + len;
  }
  state.rest = buf.slice(i);
  return n;
}

type Writes = {
  _write(chunk: Uint8Array, enc: string, cb: () => void): void;
  _writev(chunks: { chunk: Uint8Array }[], cb: () => void): void;
};

Deno.test({
  name: "startMqtt with GroupCommit: PUBACKs reach the socket only after their commit; a " +
    "failed commit acknowledges nothing and the broker sends those messages again",
  ...npmSockets,
  fn: async () => {
    const broker = await startMosquitto({ extraConfig: "max_inflight_messages 0" });
    const topic = "ingest/stream/group";
    let consumer: mqtt.MqttClient | null = null;
    let producer: mqtt.MqttClient | null = null;
    try {
      const N = 2 * MAX_GROUP + 500;
      const staged: string[] = [];
      const committed = new Set<string>();
      let durable = 0; // messages committed so far, repeats included
      let pubacks = 0; // PUBACK packets written to the socket so far
      let early = 0; // writes that carried more PUBACKs than messages were durable
      let commits = 0, failures = 0;
      let ready: () => void = () => {};
      const subscribed = new Promise<void>((r) => (ready = r));
      // Watches what the consumer writes to its socket (after mqtt.js and the cork).
      const watch = (stream: unknown) => {
        const s = stream as Writes;
        const state = { rest: [] as number[] };
        const write = s._write.bind(s), writev = s._writev.bind(s);
        const seen = (chunks: Uint8Array[]) => {
          pubacks += countPubacks(chunks, state);
          if (pubacks > durable) early++;
        };
        s._write = (chunk, enc, cb) => (seen([chunk]), write(chunk, enc, cb));
        s._writev = (chunks, cb) => (seen(chunks.map((c) => c.chunk)), writev(chunks, cb));
      };
      consumer = startMqtt(
        mqttConfig(broker.url, topic, "group-commit-test"),
        (_topic, payload) => {
          staged.push(text(payload));
          return true;
        },
        {
          connected(ok) {
            if (!ok) return;
            watch(consumer!.stream);
            setTimeout(ready, 200); // the subscription is sent right after CONNACK
          },
        },
        {
          // The first commit fails like a full disk.
          commit() {
            if (commits++ === 0) {
              failures++;
              throw new Error("disk full (test)");
            }
            durable += staged.length;
            for (const m of staged.splice(0)) committed.add(m);
          },
          rollback() {
            staged.length = 0;
          },
        },
      );
      await subscribed;

      producer = mqtt.connect(broker.url, { clientId: "group-commit-producer", clean: true });
      await new Promise<void>((r) => producer!.once("connect", () => r()));
      for (let i = 0; i < N; i++) producer.publish(topic, `m${i}`, { qos: 1 });
      const deadline = Date.now() + 20_000;
      while (committed.size < N && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      // Every message was committed: those of the failed group were sent again,
      // so none of them had been acknowledged.
      assert.equal(failures, 1);
      assert.equal(committed.size, N);
      assert.equal(early, 0, "PUBACKs written before their commit");
      assert.ok(pubacks >= N - MAX_GROUP, `${pubacks} PUBACKs written`);
      assert.ok(commits < N / 10, `${commits} commits for ${N} messages: not grouped`);
    } finally {
      await consumer?.endAsync(true);
      await producer?.endAsync(true);
      await broker.destroy();
    }
  },
});

Deno.test({
  name: "startMqtt: a message waiting for spool room when the connection breaks is taken " +
    "once, from the broker's redelivery, not also from the old connection",
  ...npmSockets,
  fn: async () => {
    const broker = await startMosquitto();
    const topic = "ingest/stream/full";
    let consumer: mqtt.MqttClient | null = null;
    try {
      let room = false; // the spool is full until the test makes room
      let connects = 0;
      const accepted: string[] = [];
      let refused = 0;
      consumer = startMqtt(
        mqttConfig(broker.url, topic, "full-spool-reconnect-test"),
        (_topic, payload) => {
          if (!room) {
            refused++;
            return false;
          }
          accepted.push(text(payload));
          return true;
        },
        { connected: (ok) => void (ok && connects++) },
      );
      const until = async (what: string, f: () => boolean) => {
        const deadline = Date.now() + 10_000;
        while (!f()) {
          if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      };
      await until("connected", () => connects === 1);
      await new Promise((r) => setTimeout(r, 200)); // SUBACK
      const producer = await mqtt.connectAsync(broker.url, { protocolVersion: 4 });
      await producer.publishAsync(topic, "m1", { qos: 1 });
      await producer.endAsync();
      await until("the first refusal", () => refused >= 1);
      // The connection breaks while the message waits for room (retried every 100 ms).
      consumer.stream.destroy();
      await until("reconnected", () => connects === 2);
      room = true;
      await until("accepted", () => accepted.length >= 1);
      await new Promise((r) => setTimeout(r, 500)); // the old retry would fire within 100 ms
      assert.deepEqual(accepted, ["m1"]);
    } finally {
      await consumer?.endAsync(true);
      await broker.destroy();
    }
  },
});

for (const protocolVersion of [4, 5] as const) {
  Deno.test({
    name: `startMqtt (MQTT ${protocolVersion === 4 ? "3.1.1" : "5"}): a retained message is ` +
      "not ingested again when the service subscribes; live messages are",
    ...npmSockets,
    fn: async () => {
      const broker = await startMosquitto();
      const topic = "ingest/stream/retained";
      let consumer: mqtt.MqttClient | null = null;
      try {
        const producer = await mqtt.connectAsync(broker.url, { protocolVersion: 4 });
        await producer.publishAsync(topic, "old", { qos: 1, retain: true });
        const accepted: string[] = [];
        let subacks = 0;
        consumer = startMqtt(
          { ...mqttConfig(broker.url, topic, `retained-test-${protocolVersion}`), protocolVersion },
          (_topic, payload) => {
            accepted.push(text(payload));
            return true;
          },
          { subscribed: () => void subacks++ },
        );
        const deadline = Date.now() + 10_000;
        while (subacks === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        await new Promise((r) => setTimeout(r, 300)); // a retained copy would arrive now
        await producer.publishAsync(topic, "live", { qos: 1 });
        while (accepted.length === 0 && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 20));
        }
        await producer.endAsync(); // (the broker and its retained message go with the test)
        assert.deepEqual(accepted, ["live"]);
      } finally {
        await consumer?.endAsync(true);
        await broker.destroy();
      }
    },
  });
}

Deno.test("Spool.read() stops at maxBytes of payloads, but always returns the first message", () => {
  const dir = Deno.makeTempDirSync({ prefix: "sif-group-" });
  try {
    const spool = Spool.open(dir);
    const big = new Uint8Array(1000);
    for (let i = 0; i < 5; i++) spool.append("t", big, i);
    assert.equal(spool.read(0, 10, 2500).length, 2);
    assert.equal(spool.read(0, 10, 3000).length, 3);
    assert.equal(spool.read(0, 2, 1e9).length, 2);
    assert.equal(spool.read(0, 10, 10).length, 1); // one message larger than the budget
    const first = spool.read(0, 10, 2000);
    assert.deepEqual(spool.read(first.at(-1)!.seq, 10, 2000).map((e) => e.seq), [
      first.at(-1)!.seq + 1,
      first.at(-1)!.seq + 2,
    ]);
    spool.close();
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
