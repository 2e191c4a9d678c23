/**
 * The benchmark's publisher, run as its own process so that it does not
 * share a CPU thread with what it measures. Publishes `count` IR messages at
 * QoS 1 (ids `first` .. `first + count - 1`), as fast as the broker takes
 * them or at `rate` messages per second, and prints one JSON line per event:
 * `{"event":"connected"}`, `{"event":"progress",...}` every 10 s and
 * `{"event":"done","published","acked","errors","first_ms","last_ms","acked_ms"}`.
 *
 * Two clients: `raw` (default) writes MQTT 3.1.1 frames to a TCP socket and
 * counts the broker's PUBACKs, many messages per write, so that the load
 * generator leaves as much of the shared CPU as possible to what is measured
 * (about a fifth of mqtt.js's CPU per message); `mqttjs` is the npm client.
 *
 * Usage: deno run --allow-net --allow-env --allow-read bench/publisher.ts '<options as JSON>'
 */

import mqtt from "mqtt";
import { messageText } from "./workload.ts";

export interface PublisherOptions {
  /** `mqtt://host:port`. */
  readonly url: string;
  readonly topic: string;
  readonly appId: string;
  readonly clientId: string;
  /** Id of the first message. */
  readonly first: number;
  readonly count: number;
  /** Messages per second; 0 publishes as fast as the broker acknowledges. */
  readonly rate: number;
  /** Most messages published but not yet acknowledged by the broker (at most 65,535). */
  readonly window: number;
  readonly client?: "raw" | "mqttjs";
}

interface Totals {
  published: number;
  acked: number;
  errors: number;
  firstMs: number;
  lastMs: number;
  ackedMs: number;
}

/** Wall-clock time in milliseconds with sub-millisecond precision. */
const wallMs = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function emit(event: string, fields: Record<string, unknown> = {}): void {
  console.log(JSON.stringify({ event, ...fields }));
}

/** How many messages should be out by now (all of them without a rate). */
function due(o: PublisherOptions, start: number): number {
  if (o.rate === 0) return o.count;
  return Math.min(o.count, Math.floor((wallMs() - start) * o.rate / 1000) + 1);
}

// ---------------------------------------------------------------------------
// raw MQTT 3.1.1 over TCP

const encoder = new TextEncoder();

function remainingLength(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return out;
}

function str(s: string): number[] {
  const b = encoder.encode(s);
  return [b.length >> 8, b.length & 0xff, ...b];
}

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
}

async function publishRaw(o: PublisherOptions, t: Totals): Promise<void> {
  const url = new URL(o.url);
  const conn = await Deno.connect({ hostname: url.hostname, port: Number(url.port || 1883) });
  conn.setNoDelay(true);
  // CONNECT: protocol "MQTT" level 4, clean session, keepalive off.
  const body = [...str("MQTT"), 4, 0x02, 0, 0, ...str(o.clientId)];
  await writeAll(conn, new Uint8Array([0x10, ...remainingLength(body.length), ...body]));

  let inflight = 0;
  let wake = null as (() => void) | null; // set in callbacks: no narrowing to null
  let connack: (code: number) => void = () => {};
  const connected = new Promise<number>((r) => (connack = r));
  const reading = (async () => {
    const buf = new Uint8Array(64 * 1024);
    let rest = new Uint8Array(0);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      let data = buf.subarray(0, n);
      if (rest.length > 0) {
        const joined = new Uint8Array(rest.length + n);
        joined.set(rest);
        joined.set(data, rest.length);
        data = joined;
      }
      let i = 0;
      while (i + 2 <= data.length) {
        const type = data[i]! >> 4, len = data[i + 1]!; // acks are short: one length byte
        if (i + 2 + len > data.length) break;
        if (type === 2) connack(data[i + 3]!);
        else if (type === 4) {
          t.acked++;
          inflight--;
        }
        i += 2 + len;
      }
      rest = data.slice(i);
      if (t.acked === o.count) t.ackedMs = wallMs();
      wake?.();
    }
    wake?.();
  })();
  const code = await connected;
  if (code !== 0) throw new Error(`broker refused the connection (CONNACK ${code})`);
  emit("connected");

  const topic = str(o.topic);
  const start = wallMs();
  let id = 0;
  const chunk = new Uint8Array(256 * 1024);
  while (t.published < o.count) {
    const until = Math.min(due(o, start), t.published + (o.window - inflight));
    if (until <= t.published) {
      // Window full, or not due yet: wait for acknowledgements or the clock.
      await new Promise<void>((r) => {
        wake = r;
        if (o.rate > 0) setTimeout(r, 1);
      });
      wake = null;
      continue;
    }
    let off = 0;
    while (t.published < until && off < chunk.length - 64 * 1024) {
      const now = wallMs();
      const payload = encoder.encode(messageText(o.appId, o.first + t.published, now));
      id = id === 0xffff ? 1 : id + 1;
      const len = topic.length + 2 + payload.length;
      chunk[off++] = 0x32; // PUBLISH, QoS 1
      for (const b of remainingLength(len)) chunk[off++] = b;
      chunk.set(topic, off);
      off += topic.length;
      chunk[off++] = id >> 8;
      chunk[off++] = id & 0xff;
      chunk.set(payload, off);
      off += payload.length;
      if (t.published === 0) t.firstMs = now;
      t.lastMs = now;
      t.published++;
      inflight++;
    }
    await writeAll(conn, chunk.subarray(0, off));
  }
  while (t.acked < o.count) {
    const before = t.acked;
    await Promise.race([new Promise<void>((r) => (wake = r)), sleep(30_000)]);
    if (t.acked === before) throw new Error(`no acknowledgement for 30 s (${t.acked} acked)`);
  }
  await writeAll(conn, new Uint8Array([0xe0, 0])); // DISCONNECT
  conn.close();
  await reading.catch(() => {});
}

// ---------------------------------------------------------------------------
// mqtt.js

async function publishMqttJs(o: PublisherOptions, t: Totals): Promise<void> {
  const client = mqtt.connect(o.url, {
    clientId: o.clientId,
    clean: true,
    protocolVersion: 4,
    reconnectPeriod: 0,
    keepalive: 60,
  });
  client.on("error", (e) => emit("error", { error: e.message }));
  await new Promise<void>((resolve, reject) => {
    client.once("connect", () => resolve());
    client.once("error", reject);
  });
  emit("connected");
  let finish: () => void = () => {};
  const finished = new Promise<void>((resolve) => (finish = resolve));
  const onAck = (err?: Error) => {
    if (err) t.errors++;
    t.acked++;
    if (t.acked === o.count) {
      t.ackedMs = wallMs();
      finish();
    } else if (o.rate === 0 && t.published - t.acked <= o.window / 2) {
      fill(t.published + o.window / 2);
    }
  };
  // Publishes messages up to id `until` (exclusive, relative), within the window.
  const fill = (until: number) => {
    const end = Math.min(o.count, until, t.acked + o.window);
    while (t.published < end) {
      const now = wallMs();
      if (t.published === 0) t.firstMs = now;
      t.lastMs = now;
      client.publish(o.topic, messageText(o.appId, o.first + t.published, now), { qos: 1 }, onAck);
      t.published++;
    }
  };
  client.on("close", () => {
    if (t.acked < o.count) {
      emit("error", { error: "connection closed", published: t.published, acked: t.acked });
      finish();
    }
  });
  const start = wallMs();
  if (o.rate === 0) fill(o.window);
  else {
    const tick = () => {
      fill(due(o, start));
      if (t.published < o.count) setTimeout(tick, 1);
    };
    tick();
  }
  await finished;
  await client.endAsync();
}

async function main(o: PublisherOptions): Promise<number> {
  const t: Totals = { published: 0, acked: 0, errors: 0, firstMs: 0, lastMs: 0, ackedMs: 0 };
  const progress = setInterval(
    () => emit("progress", { published: t.published, acked: t.acked }),
    10_000,
  );
  try {
    await (o.client === "mqttjs" ? publishMqttJs(o, t) : publishRaw(o, t));
  } catch (e) {
    emit("error", { error: (e as Error).message, published: t.published, acked: t.acked });
    return 1;
  } finally {
    clearInterval(progress);
  }
  emit("done", {
    published: t.published,
    acked: t.acked,
    errors: t.errors,
    first_ms: t.firstMs,
    last_ms: t.lastMs,
    acked_ms: t.ackedMs,
  });
  return t.acked === o.count && t.errors === 0 ? 0 : 1;
}

if (import.meta.main) {
  Deno.exit(await main(JSON.parse(Deno.args[0] ?? "{}") as PublisherOptions));
}
