/**
 * The benchmark's publisher, run as its own process so that it does not
 * share a CPU thread with what it measures. Publishes `count` IR messages at
 * QoS 1 (ids `first` .. `first + count - 1`), as fast as the broker takes
 * them or at `rate` messages per second, and prints one JSON line per event:
 * `{"event":"connected"}`, `{"event":"progress",...}` every 10 s and
 * `{"event":"done","published","acked","errors","first_ms","last_ms","acked_ms"}`.
 *
 * Usage: deno run --allow-net --allow-env --allow-read bench/publisher.ts '<options as JSON>'
 */

import mqtt from "mqtt";
import { messageText } from "./workload.ts";

export interface PublisherOptions {
  readonly url: string;
  readonly topic: string;
  readonly appId: string;
  readonly clientId: string;
  /** Id of the first message. */
  readonly first: number;
  readonly count: number;
  /** Messages per second; 0 publishes as fast as the broker acknowledges. */
  readonly rate: number;
  /** Most messages published but not yet acknowledged by the broker. */
  readonly window: number;
}

/** Wall-clock time in milliseconds with sub-millisecond precision. */
const wallMs = () => performance.timeOrigin + performance.now();

function emit(event: string, fields: Record<string, unknown> = {}): void {
  console.log(JSON.stringify({ event, ...fields }));
}

async function main(o: PublisherOptions): Promise<number> {
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

  let published = 0, acked = 0, errors = 0;
  let firstMs = 0, lastMs = 0, ackedMs = 0;
  let finish: () => void = () => {};
  const finished = new Promise<void>((resolve) => (finish = resolve));
  const onAck = (err?: Error) => {
    if (err) errors++;
    acked++;
    if (acked === o.count) {
      ackedMs = wallMs();
      finish();
    } else if (o.rate === 0 && published - acked <= o.window / 2) fill(published + o.window / 2);
  };
  // Publishes messages up to id `until` (exclusive, relative), within the window.
  const fill = (until: number) => {
    const end = Math.min(o.count, until, acked + o.window);
    while (published < end) {
      const t = wallMs();
      if (published === 0) firstMs = t;
      lastMs = t;
      client.publish(o.topic, messageText(o.appId, o.first + published, t), { qos: 1 }, onAck);
      published++;
    }
  };
  client.on("close", () => {
    if (acked < o.count) {
      emit("error", { error: "connection closed", published, acked });
      finish();
    }
  });
  const progress = setInterval(() => emit("progress", { published, acked }), 10_000);

  if (o.rate === 0) fill(o.window);
  else {
    const start = wallMs();
    const tick = () => {
      fill(Math.floor((wallMs() - start) * o.rate / 1000) + 1);
      if (published < o.count) setTimeout(tick, 1);
    };
    tick();
  }
  await finished;
  clearInterval(progress);
  emit("done", {
    published,
    acked,
    errors,
    first_ms: firstMs,
    last_ms: lastMs,
    acked_ms: ackedMs,
  });
  await client.endAsync();
  return acked === o.count && errors === 0 ? 0 : 1;
}

if (import.meta.main) {
  Deno.exit(await main(JSON.parse(Deno.args[0] ?? "{}") as PublisherOptions));
}
