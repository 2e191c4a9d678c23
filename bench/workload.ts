/**
 * The benchmark's message shape, shared by the publisher and the micro
 * benchmarks: an IR message of about 300 bytes with 5 metrics (4 numbers and
 * a string) and 2 metadata keys. `seq` is a unique id per message, so lost and
 * duplicated rows can be counted; `time` is the publish time, so the latency
 * from publish to commit can be read from the rows.
 */

/** Metrics per message (each becomes one row). */
export const ROWS_PER_MESSAGE = 5;

/** SQL for a table that fits the messages; `committed` records the insert time. */
export function createTableSql(qualifiedName: string): string {
  return `CREATE TABLE ${qualifiedName} (
    time TIMESTAMPTZ NOT NULL,
    metric VARCHAR(128) NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    site VARCHAR(128),
    seq DOUBLE PRECISION,
    status VARCHAR(128),
    committed TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())`;
}

const encoder = new TextEncoder();
const SITES = ["north-field/array-07/rack-b/unit-03", "south-field/array-12/rack-a/unit-11"];

/** One message's text for `appId`, unique id `seq`, publish time `timeMs` (ms since the epoch). */
export function messageText(appId: string, seq: number, timeMs: number): string {
  const t = (timeMs / 1000).toFixed(6);
  const device = `weather-station-${String(seq % 10_000).padStart(5, "0")}`;
  const site = SITES[seq & 1];
  const r = (seq * 7919) % 1000;
  return `{"app_id":"${appId}","data":{"time":${t},"device":"${device}",` +
    `"metadata":{"site":"${site}","seq":${seq}},` +
    `"payload":{"temperature_c":${(15 + r / 100).toFixed(2)},"humidity_pct":${40 + (r % 50)},` +
    `"pressure_hpa":${(1000 + r / 10).toFixed(1)},"wind_speed_ms":${(r / 77).toFixed(3)},` +
    `"status":"${r % 97 === 0 ? "maintenance-required" : "nominal"}"}}}`;
}

/** The same message as bytes, as it travels over MQTT. */
export function messageBytes(appId: string, seq: number, timeMs: number): Uint8Array {
  return encoder.encode(messageText(appId, seq, timeMs));
}
