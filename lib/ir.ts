/**
 * Untrusted message bytes → typed IR, or a rejection. Everything about the
 * message's own shape is decided here, once; later stages trust these types.
 * Pure: no I/O, no environment, no clock.
 */

import { identifierProblem } from "./ident.ts";
import { Reasons, reject, type Rejection } from "./rejection.ts";

/** A metadata or payload value as the sender gave it. */
export type Scalar = string | number | boolean | null;

/** One reading (`data` object) of an IR message. */
export interface Reading {
  /** Canonical UTC time with microseconds: `YYYY-MM-DDTHH:MM:SS.ffffffZ`. */
  readonly time: string;
  /** The device as sent, "" when absent; only used to attribute errors. */
  readonly device: string;
  readonly metadata: ReadonlyArray<readonly [string, Scalar]>;
  readonly payload: ReadonlyArray<readonly [string, Scalar]>;
}

/** A parsed IR message: the target table and its readings. */
export interface IrMessage {
  readonly appId: string;
  readonly readings: readonly Reading[];
}

export type ParseResult =
  | { readonly ok: true; readonly message: IrMessage }
  | { readonly ok: false; readonly rejection: Rejection };

/** Largest message accepted; larger ones are rejected, not truncated. */
export const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
/** Deepest JSON nesting accepted (a valid message needs 4). */
export const MAX_DEPTH = 32;
/** Names that metadata keys and string metrics may not take. */
export const CORE_COLUMNS: ReadonlySet<string> = new Set(["time", "metric", "value"]);

const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false });

class Reject {
  constructor(readonly reason: string) {}
}

/** Parses one raw MQTT payload into IR, or says why it cannot be stored. */
export function parseMessage(bytes: Uint8Array): ParseResult {
  if (bytes.length > MAX_MESSAGE_BYTES) {
    return fail(`message too large (${bytes.length} bytes, limit ${MAX_MESSAGE_BYTES})`);
  }
  let text: string;
  try {
    text = decoder.decode(bytes);
  } catch {
    return fail("message is not valid UTF-8");
  }
  const shape = scan(text);
  if (shape.tooDeep) return fail(`message nested too deeply (limit ${MAX_DEPTH})`);
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch {
    return fail("invalid JSON");
  }
  if (!isObject(root)) return fail("message is not a JSON object");
  if (countKeys(root) !== shape.colons) return fail("duplicate key in JSON object");

  const rawApp = root.app_id;
  if (rawApp === undefined || rawApp === null) return fail("missing app_id");
  if (typeof rawApp !== "string") return fail("invalid app_id (expected string)");
  const appId = rawApp;
  const appProblem = identifierProblem(appId);
  // A bad app id is stored in "errorTable" only once made safe for text.
  if (appProblem) return fail(`app_id ${appProblem}`, safeText(appId));

  const data = root.data;
  if (data === undefined || data === null) return fail("missing data", appId);
  const blobs = Array.isArray(data) ? data : [data];
  if (blobs.length === 0) return fail(Reasons.emptyPayload, appId);
  const readings: Reading[] = [];
  for (const blob of blobs) {
    const device = isObject(blob) && typeof blob.device === "string" ? safeText(blob.device) : "";
    try {
      readings.push(parseReading(blob));
    } catch (e) {
      if (e instanceof Reject) return fail(e.reason, appId, device);
      throw e;
    }
  }
  return { ok: true, message: { appId, readings } };
}

function fail(reason: string, appId = "", device = ""): ParseResult {
  return { ok: false, rejection: reject(reason, appId, device) };
}

function parseReading(blob: unknown): Reading {
  if (!isObject(blob)) throw new Reject("invalid data (expected object)");
  const time = parseTime(blob.time);

  let device = "";
  if (blob.device !== undefined && blob.device !== null) {
    if (typeof blob.device !== "string") throw new Reject("invalid device (expected string)");
    checkText(blob.device, "device");
    device = blob.device;
  }

  const metadata: Array<readonly [string, Scalar]> = [];
  if (blob.metadata !== undefined && blob.metadata !== null) {
    if (!isObject(blob.metadata)) throw new Reject("invalid metadata (expected object)");
    for (const key of Object.keys(blob.metadata)) {
      checkColumnName(key, "metadata key");
      metadata.push([key, scalar(blob.metadata[key])]);
    }
  }

  const rawPayload = blob.payload;
  if (rawPayload === undefined || rawPayload === null) throw new Reject(Reasons.emptyPayload);
  if (!isObject(rawPayload)) throw new Reject(Reasons.objectForPrimitive);
  const payload: Array<readonly [string, Scalar]> = [];
  for (const name of Object.keys(rawPayload)) {
    const value = scalar(rawPayload[name]);
    if (typeof value === "string") checkColumnName(name, "string metric");
    else if (name.length === 0) throw new Reject("metric name is empty");
    else checkText(name, "metric name");
    payload.push([name, value]);
  }
  if (payload.length === 0) throw new Reject(Reasons.emptyPayload);
  return { time, device, metadata, payload };
}

function checkColumnName(name: string, what: string): void {
  const problem = identifierProblem(name);
  if (problem) throw new Reject(`${what} ${problem}`);
  if (CORE_COLUMNS.has(name)) throw new Reject(`${what} "${name}" is reserved`);
}

function checkText(s: string, what: string): void {
  if (s.includes("\0")) throw new Reject(`${what} contains a NUL character`);
  if (!s.isWellFormed()) throw new Reject(`${what} is not valid Unicode`);
}

function scalar(v: unknown): Scalar {
  switch (typeof v) {
    case "string":
      checkText(v, "text");
      return v;
    case "number":
      // JSON.parse turns 1e400 into Infinity; it cannot be stored.
      if (!Number.isFinite(v)) throw new Reject(Reasons.objectForPrimitive);
      return v;
    case "boolean":
      return v;
    default:
      if (v === null) return null;
      throw new Reject(Reasons.objectForPrimitive);
  }
}

// ---------------------------------------------------------------------------
// Time

/** 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in epoch seconds. */
const MIN_SECONDS = -62135596800;
const MAX_SECONDS = 253402300800;

/** Seconds (number) or ISO-8601 (string) → canonical UTC text with microseconds. */
export function parseTime(v: unknown): string {
  if (v === undefined || v === null) throw new Reject("missing time");
  if (typeof v === "number") return fromEpoch(v, 0);
  if (typeof v === "string") return fromIso(v);
  throw new Reject("invalid time (expected seconds since the epoch or an ISO-8601 string)");
}

/** `fromNumber`: the sender gave a number, so a milliseconds mix-up is worth a hint. */
function fromEpoch(seconds: number, extraMicros: number, fromNumber = true): string {
  if (!Number.isFinite(seconds)) throw new Reject("invalid time");
  let whole = Math.floor(seconds);
  let micros = Math.round((seconds - whole) * 1e6) + extraMicros;
  if (micros >= 1e6) {
    whole += 1;
    micros -= 1e6;
  }
  if (whole < MIN_SECONDS || whole >= MAX_SECONDS) {
    const looksLikeMs = fromNumber && seconds / 1000 >= MIN_SECONDS &&
      seconds / 1000 < MAX_SECONDS &&
      Math.abs(seconds) >= 1e11;
    throw new Reject(
      looksLikeMs
        ? "time out of range (milliseconds sent instead of seconds?)"
        : "time out of range (years 1 to 9999)",
    );
  }
  const iso = new Date(whole * 1000).toISOString(); // YYYY-MM-DDTHH:MM:SS.000Z
  return iso.slice(0, 19) + "." + String(micros).padStart(6, "0") + "Z";
}

const ISO =
  /^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,12}))?)?(Z|z|[+-]\d{2}(?::?\d{2})?)?)?$/;

function fromIso(s: string): string {
  const m = ISO.exec(s);
  if (!m) throw new Reject("invalid time (expected seconds since the epoch or an ISO-8601 string)");
  const [, y, mo, d, h = "0", mi = "0", sec = "0", frac = "", zone] = m;
  const year = Number(y), month = Number(mo), day = Number(d);
  const hour = Number(h), minute = Number(mi), second = Number(sec);
  if (month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59) {
    throw new Reject("invalid time (field out of range)");
  }
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  if (date.getUTCMonth() !== month - 1 || date.getUTCDate() !== day) {
    throw new Reject("invalid time (no such date)");
  }
  date.setUTCHours(hour, minute, second, 0);
  let offsetMinutes = 0;
  if (zone && zone !== "Z" && zone !== "z") {
    const sign = zone[0] === "-" ? -1 : 1;
    const digits = zone.slice(1).replace(":", "");
    const oh = Number(digits.slice(0, 2)), om = Number(digits.slice(2) || "0");
    if (oh > 15 || om > 59) throw new Reject("invalid time (offset out of range)");
    offsetMinutes = sign * (oh * 60 + om);
  }
  const micros = frac === "" ? 0 : Math.round(Number("0." + frac) * 1e6);
  return fromEpoch(date.getTime() / 1000 - offsetMinutes * 60, micros, false);
}

// ---------------------------------------------------------------------------
// JSON shape

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Counts `:` outside strings (one per object member) and checks nesting depth. */
function scan(text: string): { colons: number; tooDeep: boolean } {
  let colons = 0, depth = 0, inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 92) i++; // backslash: skip the escaped character
      else if (c === 34) inString = false;
    } else if (c === 34) inString = true;
    else if (c === 58) colons++;
    else if (c === 123 || c === 91) {
      if (++depth > MAX_DEPTH) return { colons, tooDeep: true };
    } else if (c === 125 || c === 93) depth--;
  }
  return { colons, tooDeep: false };
}

/** Members in all objects of a parsed tree; fewer than colons means duplicate keys. */
function countKeys(root: unknown): number {
  let count = 0;
  const stack: unknown[] = [root];
  while (stack.length > 0) {
    const v = stack.pop();
    if (Array.isArray(v)) {
      for (const item of v) if (typeof item === "object" && item !== null) stack.push(item);
    } else if (typeof v === "object" && v !== null) {
      const values = Object.values(v);
      count += values.length;
      for (const item of values) if (typeof item === "object" && item !== null) stack.push(item);
    }
  }
  return count;
}

/** Makes sender text safe to store in a text column (for error attribution only). */
export function safeText(s: string, maxChars = 128): string {
  const clean = s.replaceAll("\0", "\uFFFD").toWellFormed();
  const chars = Array.from(clean);
  return chars.length <= maxChars ? clean : chars.slice(0, maxChars).join("");
}
