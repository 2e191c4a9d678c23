/**
 * One JSON object per line on stdout: `{"level","time","msg",...fields}`.
 * Callers pass only the fields that matter (app_id, device, topic, error);
 * never secrets, connection strings or row values.
 */

export type Level = "debug" | "info" | "warn" | "error";

const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };
let threshold = ORDER.info;
const encoder = new TextEncoder();

/** Sets the lowest level that is written (from `LOG_LEVEL`). */
export function setLogLevel(level: Level): void {
  threshold = ORDER[level];
}

/** True when `level` would be written, to skip building costly fields. */
export function enabled(level: Level): boolean {
  return ORDER[level] >= threshold;
}

/** Writes one log line. Errors in `fields` become their message, never a stack. */
export function log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
  if (ORDER[level] < threshold) return;
  const line: Record<string, unknown> = { level, time: new Date().toISOString(), msg };
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined) continue;
    line[k] = v instanceof Error ? v.message : v;
  }
  Deno.stdout.writeSync(encoder.encode(JSON.stringify(line) + "\n"));
}
