/**
 * The naive consumer the service is compared with: npm mqtt + one awaited
 * INSERT (autocommit) per message, acknowledged after the insert, messages
 * handled strictly one at a time. The shape of the script the service
 * replaces, on the same workload. Prints `{"event":"subscribed"}`,
 * `{"event":"progress","processed"}` every second and `{"event":"done"}` once
 * `count` messages are in. With `insert: false` it only acknowledges (the
 * ceiling of broker + mqtt.js on this machine).
 *
 * Usage: deno run --allow-net --allow-env --allow-read bench/baseline.ts '<options as JSON>'
 */

import mqtt from "mqtt";
import postgres from "postgres";

export interface BaselineOptions {
  readonly url: string;
  readonly topic: string;
  readonly clientId: string;
  readonly db: { host: string; port: number; user: string; database: string };
  /** Schema-qualified, quoted table name. */
  readonly table: string;
  readonly count: number;
  /** False: acknowledge without touching the database (the broker's own ceiling). */
  readonly insert?: boolean;
}

function emit(event: string, fields: Record<string, unknown> = {}): void {
  console.log(JSON.stringify({ event, ...fields }));
}

const quote = (name: string) => '"' + name.replaceAll('"', '""') + '"';

function main(o: BaselineOptions): Promise<number> {
  const sql = postgres({ ...o.db, max: 1, onnotice: () => {} });
  const decoder = new TextDecoder();

  /** One INSERT of all the message's rows, the way the old script built it. */
  const insert = async (payload: Uint8Array) => {
    const { data } = JSON.parse(decoder.decode(payload));
    const meta = Object.entries(data.metadata ?? {});
    const columns = ["time", "metric", "value", ...meta.map(([k]) => k)];
    const rows: unknown[][] = [];
    const extra: string[] = [];
    for (const [metric, v] of Object.entries(data.payload)) {
      if (typeof v === "string") {
        if (!extra.includes(metric)) extra.push(metric);
        rows.push([data.time, metric, 0, ...meta.map(([, m]) => m), [metric, v]]);
      } else rows.push([data.time, metric, Number(v), ...meta.map(([, m]) => m), null]);
    }
    const all = [...columns, ...extra];
    const values: unknown[] = [];
    const tuples = rows.map((r) => {
      const text = r.slice(0, -1) as unknown[];
      const str = r[r.length - 1] as [string, string] | null;
      for (const c of extra) text.push(str && str[0] === c ? str[1] : null);
      const ps = text.map((v) => (values.push(v), `$${values.length}`));
      ps[0] = `to_timestamp(${ps[0]}::float8)`;
      return `(${ps.join(", ")})`;
    });
    await sql.unsafe(
      `INSERT INTO ${o.table} (${all.map(quote).join(", ")}) VALUES ${tuples.join(", ")}`,
      values as never[],
    );
  };

  let processed = 0;
  return new Promise((resolve) => {
    const client = mqtt.connect(o.url, { clientId: o.clientId, clean: false, protocolVersion: 4 });
    client.on("error", (e) => emit("error", { error: e.message }));
    client.handleMessage = (packet, done) => {
      (o.insert === false ? Promise.resolve() : insert(packet.payload as Uint8Array)).then(
        () => {
          processed++;
          done();
          if (processed === o.count) {
            emit("done", { processed, at_ms: performance.timeOrigin + performance.now() });
            clearInterval(progress);
            client.end(false, {}, () => sql.end().then(() => resolve(0)));
          }
        },
        (e) => {
          emit("error", { error: (e as Error).message });
          done();
        },
      );
    };
    client.once("connect", () => {
      client.subscribe(o.topic, { qos: 1 }, (err) => {
        if (err) {
          emit("error", { error: err.message });
          resolve(1);
        } else emit("subscribed");
      });
    });
    const progress = setInterval(() => emit("progress", { processed }), 1000);
  });
}

if (import.meta.main) {
  Deno.exit(await main(JSON.parse(Deno.args[0] ?? "{}") as BaselineOptions));
}
