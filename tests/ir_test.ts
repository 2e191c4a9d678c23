/**
 * lib/ir.ts: untrusted bytes → IR or a rejection. Table driven: every case
 * asserts the exact IR or the exact rejection (reason, app id, device).
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  CORE_COLUMNS,
  type IrMessage,
  MAX_DEPTH,
  MAX_MESSAGE_BYTES,
  parseMessage,
  type ParseResult,
  type Reading,
  safeText,
  type Scalar,
} from "../lib/ir.ts";
import { Reasons, type Rejection } from "../lib/rejection.ts";

const enc = new TextEncoder();

/** Raw JSON text, raw bytes, or a value that is JSON.stringify'd. */
type Input = string | Uint8Array | Record<string, unknown>;

function run(input: Input): ParseResult {
  if (input instanceof Uint8Array) return parseMessage(input);
  return parseMessage(enc.encode(typeof input === "string" ? input : JSON.stringify(input)));
}

function rejectionOf(input: Input): Rejection {
  const r = run(input);
  if (r.ok) assert.fail(`expected a rejection, got ${JSON.stringify(r.message)}`);
  return r.rejection;
}

function messageOf(input: Input): IrMessage {
  const r = run(input);
  if (!r.ok) assert.fail(`expected IR, got rejection ${JSON.stringify(r.rejection)}`);
  return r.message;
}

const T = 1700000000;
const T_ISO = "2023-11-14T22:13:20.000000Z";

/** A valid message whose `data` fields are overridden (undefined removes a field). */
function msg(data: Record<string, unknown> = {}, appId: unknown = "app"): Record<string, unknown> {
  return { app_id: appId, data: { time: T, payload: { x: 1 }, ...data } };
}

function reading(r: Partial<Reading>): Reading {
  return { time: T_ISO, device: "", metadata: [], payload: [["x", 1]], ...r };
}

interface RejectCase {
  name: string;
  input: Input;
  reason: string;
  appId?: string;
  device?: string;
}

function rejectCases(group: string, cases: RejectCase[]): void {
  for (const c of cases) {
    Deno.test(`parseMessage rejects (${group}): ${c.name}`, () => {
      assert.deepEqual(rejectionOf(c.input), {
        reason: c.reason,
        appId: c.appId ?? "",
        device: c.device ?? "",
      });
    });
  }
}

// ---------------------------------------------------------------------------
// The SPEC's user-facing error strings, byte for byte.

Deno.test("Reasons are the SPEC section 4 strings byte for byte", () => {
  assert.deepEqual({ ...Reasons }, {
    invalidApp: "invalid app",
    invalidMetadata: "invalid metadata",
    stringForNumber: "unexpected string (expected number)",
    booleanForNumber: "unexpected boolean (expected number)",
    objectForPrimitive: "unexpected object (expected primitive)",
    emptyPayload: "assertion failure: received empty payload (no metrics)",
  });
  assert.deepEqual([...CORE_COLUMNS], ["time", "metric", "value"]);
  assert.equal(MAX_DEPTH, 32);
  assert.equal(MAX_MESSAGE_BYTES, 4 * 1024 * 1024);
});

// ---------------------------------------------------------------------------
// The SPEC example.

Deno.test("parseMessage: the SPEC section 1 example", () => {
  const text = `{
    "app_id": "alice_weather",
    "data": {
      "time": 1700000000.25,
      "device": "station-7",
      "metadata": { "site": "roof", "floor": 3 },
      "payload": { "temperature": 21.5, "humidity": 40, "status": "ok" }
    }
  }`;
  assert.deepEqual(messageOf(text), {
    appId: "alice_weather",
    readings: [{
      time: "2023-11-14T22:13:20.250000Z",
      device: "station-7",
      metadata: [["site", "roof"], ["floor", 3]],
      payload: [["temperature", 21.5], ["humidity", 40], ["status", "ok"]],
    }],
  });
});

Deno.test("parseMessage: data as an array of blobs gives one reading each, in order", () => {
  const m = messageOf({
    app_id: "app",
    data: [
      { time: T, device: "d1", payload: { a: 1 } },
      { time: "2023-11-14T22:13:21Z", payload: { b: true, c: null } },
    ],
  });
  assert.deepEqual(m, {
    appId: "app",
    readings: [
      reading({ device: "d1", payload: [["a", 1]] }),
      reading({ time: "2023-11-14T22:13:21.000000Z", payload: [["b", true], ["c", null]] }),
    ],
  });
});

Deno.test("parseMessage: unknown fields are ignored; a BOM is accepted", () => {
  const m = messageOf({
    app_id: "app",
    extra: [1, { a: 2 }],
    data: { ...msg().data as object, x: 1 },
  });
  assert.deepEqual(m, { appId: "app", readings: [reading({})] });
  const bom = new Uint8Array([0xef, 0xbb, 0xbf, ...enc.encode(JSON.stringify(msg()))]);
  assert.deepEqual(messageOf(bom), { appId: "app", readings: [reading({})] });
});

// ---------------------------------------------------------------------------
// Bytes and JSON.

rejectCases("bytes/JSON", [
  { name: "trailing comma", input: '{"app_id":"a",}', reason: "invalid JSON" },
  { name: "empty message", input: "", reason: "invalid JSON" },
  { name: "whitespace only", input: "  \n", reason: "invalid JSON" },
  { name: "single quotes", input: "{'app_id':'a'}", reason: "invalid JSON" },
  { name: "trailing garbage", input: JSON.stringify(msg()) + " x", reason: "invalid JSON" },
  {
    name: "two objects",
    input: JSON.stringify(msg()) + JSON.stringify(msg()),
    reason: "invalid JSON",
  },
  {
    name: "NaN literal",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":NaN}}}',
    reason: "invalid JSON",
  },
  {
    name: "Infinity literal",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":Infinity}}}',
    reason: "invalid JSON",
  },
  {
    name: "-Infinity literal",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":-Infinity}}}',
    reason: "invalid JSON",
  },
  {
    name: "raw NUL byte inside a string",
    input: '{"app_id":"a\u0000","data":{"time":1,"payload":{"x":1}}}',
    reason: "invalid JSON",
  },
  {
    name: "raw newline inside a string",
    input: '{"app_id":"a\n","data":{"time":1,"payload":{"x":1}}}',
    reason: "invalid JSON",
  },
  { name: "array", input: "[]", reason: "message is not a JSON object" },
  { name: "number", input: "1", reason: "message is not a JSON object" },
  { name: "string", input: '"s"', reason: "message is not a JSON object" },
  { name: "null", input: "null", reason: "message is not a JSON object" },
  { name: "true", input: "true", reason: "message is not a JSON object" },
  { name: "UTF-8: 0xFF", input: new Uint8Array([0xff]), reason: "message is not valid UTF-8" },
  {
    name: "UTF-8: overlong '/' (C0 AF)",
    input: new Uint8Array([0x7b, 0xc0, 0xaf, 0x7d]),
    reason: "message is not valid UTF-8",
  },
  {
    name: "UTF-8: encoded surrogate (ED A0 80) inside a string value",
    input: new Uint8Array([
      ...enc.encode('{"app_id":"a","data":{"time":1,"payload":{"x":"'),
      0xed,
      0xa0,
      0x80,
      ...enc.encode('"}}}'),
    ]),
    reason: "message is not valid UTF-8",
  },
  {
    name: "UTF-8: truncated sequence at the end",
    input: new Uint8Array([...enc.encode(JSON.stringify(msg())), 0xe2, 0x82]),
    reason: "message is not valid UTF-8",
  },
  {
    name: "UTF-8: Latin-1 é (E9) in a metadata key",
    input: new Uint8Array([
      ...enc.encode('{"app_id":"a","data":{"time":1,"metadata":{"caf'),
      0xe9,
      ...enc.encode('":1},"payload":{"x":1}}}'),
    ]),
    reason: "message is not valid UTF-8",
  },
  {
    name: "larger than MAX_MESSAGE_BYTES",
    input: new Uint8Array(MAX_MESSAGE_BYTES + 1),
    reason: "message too large (4194305 bytes, limit 4194304)",
  },
]);

Deno.test("parseMessage: a message of exactly MAX_MESSAGE_BYTES is parsed", () => {
  const base = JSON.stringify(msg());
  const padded = base.slice(0, -1) + " ".repeat(MAX_MESSAGE_BYTES - base.length) + "}";
  assert.equal(enc.encode(padded).length, MAX_MESSAGE_BYTES);
  assert.deepEqual(messageOf(padded), { appId: "app", readings: [reading({})] });
});

// ---------------------------------------------------------------------------
// Duplicate keys (JSON.parse silently keeps the last one; we refuse).

const dup = "duplicate key in JSON object";
rejectCases("duplicate keys", [
  {
    name: "top level",
    input: '{"app_id":"a","app_id":"b","data":{"time":1,"payload":{"x":1}}}',
    reason: dup,
  },
  {
    name: "top-level data twice",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":1}},"data":{"time":1,"payload":{"y":1}}}',
    reason: dup,
  },
  {
    name: "in data",
    input: '{"app_id":"a","data":{"time":1,"time":2,"payload":{"x":1}}}',
    reason: dup,
  },
  {
    name: "in metadata",
    input: '{"app_id":"a","data":{"time":1,"metadata":{"k":"a","k":"b"},"payload":{"x":1}}}',
    reason: dup,
  },
  {
    name: "in payload",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":1,"x":2}}}',
    reason: dup,
  },
  {
    name: "in the second blob of a data array",
    input:
      '{"app_id":"a","data":[{"time":1,"payload":{"x":1}},{"time":1,"payload":{"y":1,"y":2}}]}',
    reason: dup,
  },
  {
    name: "in an ignored field nested in an array",
    input: '{"app_id":"a","extra":[[{"q":1,"q":2}]],"data":{"time":1,"payload":{"x":1}}}',
    reason: dup,
  },
  {
    name: "same key spelled with a \\u escape",
    input: '{"app_id":"a","data":{"time":1,"payload":{"x":1,"\\u0078":2}}}',
    reason: dup,
  },
  {
    name: "keys with an escaped quote",
    input: String.raw`{"app_id":"a","data":{"time":1,"payload":{"x\"":1,"x\"":2}}}`,
    reason: dup,
  },
  {
    name: "keys ending in a backslash",
    input: String.raw`{"app_id":"a","data":{"time":1,"payload":{"x\\":1,"x\\":2}}}`,
    reason: dup,
  },
  {
    name: "keys containing colons and braces",
    input: '{"app_id":"a","data":{"time":1,"payload":{"a:{}:":1,"a:{}:":2}}}',
    reason: dup,
  },
  {
    name: "__proto__ twice",
    input: '{"app_id":"a","data":{"time":1,"payload":{"__proto__":1,"__proto__":2}}}',
    reason: dup,
  },
]);

Deno.test("parseMessage: colons, braces and escaped quotes inside strings do not confuse the scanner", () => {
  // app_id `a\":{[`; payload keys `x:y`, `s` (value `\":}]`), `y\`, `q"`, `a` (distinct from `a"`).
  const text = String
    .raw`{"app_id":"a\\\":{[","data":{"time":1,"payload":{"x:y":1,"s":"\\\":}]","y\\":2,"q\"":3,"a":4,"a\"":5}}}`;
  assert.deepEqual(messageOf(text), {
    appId: 'a\\":{[',
    readings: [{
      time: "1970-01-01T00:00:01.000000Z",
      device: "",
      metadata: [],
      payload: [["x:y", 1], ["s", '\\":}]'], ["y\\", 2], ['q"', 3], ["a", 4], ['a"', 5]],
    }],
  });
});

Deno.test("parseMessage: tricky strings round-trip through JSON.stringify without false duplicates", () => {
  const tricky = ['a\\":', '":{', "}}]]", '\\\\"', "a\\", ":", '"', "{", "[", "\\u0078"];
  const metadata = Object.fromEntries(tricky.map((s, i) => [`${s}${i}`, s]));
  const m = messageOf(msg({ metadata }));
  assert.deepEqual(m.readings[0]!.metadata, tricky.map((s, i) => [`${s}${i}`, s]));
});

Deno.test("parseMessage: __proto__ keys are plain data, never a prototype", () => {
  assert.deepEqual(
    rejectionOf('{"__proto__":{"app_id":"evil"},"data":{"time":1,"payload":{"x":1}}}'),
    { reason: "missing app_id", appId: "", device: "" },
  );
  const m = messageOf(
    '{"app_id":"a","data":{"time":1,"metadata":{"__proto__":"m"},"payload":{"__proto__":1}}}',
  );
  assert.deepEqual(m.readings[0]!.metadata, [["__proto__", "m"]]);
  assert.deepEqual(m.readings[0]!.payload, [["__proto__", 1]]);
});

// ---------------------------------------------------------------------------
// Nesting depth.

const tooDeep = "message nested too deeply (limit 32)";

Deno.test("parseMessage: 100,000 nested arrays are rejected quickly, without a stack overflow", () => {
  const text = "[".repeat(100_000) + "]".repeat(100_000);
  const t0 = performance.now();
  assert.deepEqual(rejectionOf(text), { reason: tooDeep, appId: "", device: "" });
  assert.ok(performance.now() - t0 < 1000, `took ${performance.now() - t0} ms`);
});

Deno.test("parseMessage: 100,000 nested objects are rejected quickly", () => {
  const text = '{"a":'.repeat(100_000) + "1" + "}".repeat(100_000);
  const t0 = performance.now();
  assert.deepEqual(rejectionOf(text), { reason: tooDeep, appId: "", device: "" });
  assert.ok(performance.now() - t0 < 1000, `took ${performance.now() - t0} ms`);
});

Deno.test("parseMessage: 1,000,000 unbalanced brackets are rejected as too deep", () => {
  assert.deepEqual(rejectionOf("[".repeat(1_000_000)), { reason: tooDeep, appId: "", device: "" });
});

Deno.test("parseMessage: depth 32 is accepted, 33 rejected; brackets inside strings do not count", () => {
  // root object = 1, data = 2, so n nested arrays in data.extra reach depth 2 + n.
  const nested = (n: number) =>
    `{"app_id":"a","data":{"extra":${"[".repeat(n)}${"]".repeat(n)},"time":1,"payload":{"x":1}}}`;
  assert.equal(messageOf(nested(30)).appId, "a");
  assert.deepEqual(rejectionOf(nested(31)), { reason: tooDeep, appId: "", device: "" });
  const inString = "[{".repeat(1000);
  const m = messageOf(msg({ metadata: { k: inString } }));
  assert.deepEqual(m.readings[0]!.metadata, [["k", inString]]);
});

// ---------------------------------------------------------------------------
// app_id.

rejectCases("app_id", [
  { name: "missing", input: { data: msg().data }, reason: "missing app_id" },
  { name: "null", input: msg({}, null), reason: "missing app_id" },
  { name: "number", input: msg({}, 5), reason: "invalid app_id (expected string)" },
  { name: "object", input: msg({}, { a: 1 }), reason: "invalid app_id (expected string)" },
  { name: "array", input: msg({}, ["a"]), reason: "invalid app_id (expected string)" },
  { name: "empty", input: msg({}, ""), reason: "app_id is empty" },
  {
    name: "64 ASCII bytes",
    input: msg({}, "a".repeat(64)),
    reason: "app_id is 64 bytes long (PostgreSQL allows 63)",
    appId: "a".repeat(64),
  },
  {
    name: "32 x é = 64 bytes",
    input: msg({}, "é".repeat(32)),
    reason: "app_id is 64 bytes long (PostgreSQL allows 63)",
    appId: "é".repeat(32),
  },
  {
    name: "16 emoji = 64 bytes",
    input: msg({}, "😀".repeat(16)),
    reason: "app_id is 64 bytes long (PostgreSQL allows 63)",
    appId: "😀".repeat(16),
  },
  {
    name: "200 bytes: attributed to its first 128 characters",
    input: msg({}, "b".repeat(200)),
    reason: "app_id is 200 bytes long (PostgreSQL allows 63)",
    appId: "b".repeat(128),
  },
  {
    name: "NUL (attributed with U+FFFD)",
    input: msg({}, "a\0b"),
    reason: "app_id contains a NUL character",
    appId: "a\uFFFDb",
  },
  {
    name: 'lone surrogate escape "\\ud800"',
    input: '{"app_id":"a\\ud800","data":{"time":1,"payload":{"x":1}}}',
    reason: "app_id is not valid Unicode",
    appId: "a\uFFFD",
  },
]);

const goodAppIds: Array<[string, string]> = [
  ["63 ASCII bytes", "a".repeat(63)],
  ["21 x é = 42 bytes", "é".repeat(21)],
  ["31 x é + a = 63 bytes", "é".repeat(31) + "a"],
  ["15 emoji = 60 bytes", "😀".repeat(15)],
  ["surrogate pair escape", "\ud83d\ude00"],
  ["double quotes", 'a"b""c'],
  ["statement", 'x"; DROP TABLE x; --'],
  ["comment", "a/* c */--"],
  ["reserved word", "select"],
  ["mixed case", "Alice_Weather"],
  ["errorTable (refused later, by translate)", "errorTable"],
];
for (const [name, appId] of goodAppIds) {
  Deno.test(`parseMessage accepts app_id: ${name}, kept exactly`, () => {
    assert.deepEqual(messageOf(msg({}, appId)), { appId, readings: [reading({})] });
  });
}

Deno.test("parseMessage: an escaped surrogate pair is one code point", () => {
  const m = messageOf('{"app_id":"\\ud83d\\ude00","data":{"time":1,"payload":{"x":1}}}');
  assert.equal(m.appId, "😀");
});

// ---------------------------------------------------------------------------
// data.

rejectCases("data", [
  { name: "missing", input: { app_id: "app" }, reason: "missing data", appId: "app" },
  { name: "null", input: { app_id: "app", data: null }, reason: "missing data", appId: "app" },
  {
    name: "empty array",
    input: { app_id: "app", data: [] },
    reason: Reasons.emptyPayload,
    appId: "app",
  },
  {
    name: "number",
    input: { app_id: "app", data: 5 },
    reason: "invalid data (expected object)",
    appId: "app",
  },
  {
    name: "array of strings",
    input: { app_id: "app", data: ["x"] },
    reason: "invalid data (expected object)",
    appId: "app",
  },
  {
    name: "nested array",
    input: { app_id: "app", data: [[msg().data]] },
    reason: "invalid data (expected object)",
    appId: "app",
  },
  {
    name: "one bad blob rejects the whole array (atomic)",
    input: {
      app_id: "app",
      data: [
        { time: T, device: "good", payload: { x: 1 } },
        { time: T, device: "bad", payload: { x: {} } },
        { time: T, device: "good2", payload: { x: 1 } },
      ],
    },
    reason: Reasons.objectForPrimitive,
    appId: "app",
    device: "bad",
  },
]);

// ---------------------------------------------------------------------------
// time.

const acceptedTimes: Array<[unknown, string]> = [
  [1700000000, "2023-11-14T22:13:20.000000Z"],
  [1700000000.25, "2023-11-14T22:13:20.250000Z"],
  [1700000000.123456, "2023-11-14T22:13:20.123456Z"],
  [1700000000.000001, "2023-11-14T22:13:20.000001Z"],
  [1700000000.9999996, "2023-11-14T22:13:21.000000Z"], // rounds up into the next second
  [0, "1970-01-01T00:00:00.000000Z"],
  [-1.5, "1969-12-31T23:59:58.500000Z"],
  [-0.000001, "1969-12-31T23:59:59.999999Z"],
  [-86400.25, "1969-12-30T23:59:59.750000Z"],
  [-62135596800, "0001-01-01T00:00:00.000000Z"],
  [253402300799.5, "9999-12-31T23:59:59.500000Z"],
  ["2023-11-14T22:13:20Z", "2023-11-14T22:13:20.000000Z"],
  ["2023-11-14t22:13:20z", "2023-11-14T22:13:20.000000Z"],
  ["2023-11-14T22:13:20.123456Z", "2023-11-14T22:13:20.123456Z"],
  ["2023-11-14T22:13:20.1234567Z", "2023-11-14T22:13:20.123457Z"],
  ["2023-11-14T22:13:20.5Z", "2023-11-14T22:13:20.500000Z"],
  ["2023-11-14T22:13:20,5Z", "2023-11-14T22:13:20.500000Z"],
  ["2023-11-14T23:59:59.9999999Z", "2023-11-15T00:00:00.000000Z"],
  ["2023-11-15T00:13:20+02:00", "2023-11-14T22:13:20.000000Z"],
  ["2023-11-15T00:13:20+0200", "2023-11-14T22:13:20.000000Z"],
  ["2023-11-15T00:13:20+02", "2023-11-14T22:13:20.000000Z"],
  ["2023-11-14T17:43:20-04:30", "2023-11-14T22:13:20.000000Z"],
  ["2023-01-01T00:30:00+01:00", "2022-12-31T23:30:00.000000Z"],
  ["2023-11-14T22:13:20", "2023-11-14T22:13:20.000000Z"], // no offset: UTC
  ["2023-11-14 22:13:20", "2023-11-14T22:13:20.000000Z"], // space separator
  ["2023-11-14 22:13:20.25+00:00", "2023-11-14T22:13:20.250000Z"],
  ["2023-11-14T22:13", "2023-11-14T22:13:00.000000Z"],
  ["2023-11-14", "2023-11-14T00:00:00.000000Z"], // date only: midnight UTC
  ["2024-02-29", "2024-02-29T00:00:00.000000Z"],
  ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z"],
  ["9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"],
];
for (const [time, expected] of acceptedTimes) {
  Deno.test(`parseMessage time ${JSON.stringify(time)} → ${expected}`, () => {
    assert.deepEqual(messageOf(msg({ time })).readings, [reading({ time: expected })]);
  });
}

const badTime = "invalid time (expected seconds since the epoch or an ISO-8601 string)";
const yearRange = "time out of range (years 1 to 9999)";
rejectCases("time", [
  { name: "missing", input: msg({ time: undefined }), reason: "missing time", appId: "app" },
  { name: "null", input: msg({ time: null }), reason: "missing time", appId: "app" },
  { name: "boolean", input: msg({ time: true }), reason: badTime, appId: "app" },
  { name: "object", input: msg({ time: {} }), reason: badTime, appId: "app" },
  { name: "array", input: msg({ time: [T] }), reason: badTime, appId: "app" },
  // PostgreSQL would accept these special strings; they are not times a sender measured.
  { name: '"now"', input: msg({ time: "now" }), reason: badTime, appId: "app" },
  { name: '"epoch"', input: msg({ time: "epoch" }), reason: badTime, appId: "app" },
  { name: '"today"', input: msg({ time: "today" }), reason: badTime, appId: "app" },
  { name: '"infinity"', input: msg({ time: "infinity" }), reason: badTime, appId: "app" },
  { name: '"allballs"', input: msg({ time: "allballs" }), reason: badTime, appId: "app" },
  { name: "empty string", input: msg({ time: "" }), reason: badTime, appId: "app" },
  {
    name: "epoch seconds as a string",
    input: msg({ time: "1700000000" }),
    reason: badTime,
    appId: "app",
  },
  {
    name: "leading space",
    input: msg({ time: " 2023-11-14T22:13:20Z" }),
    reason: badTime,
    appId: "app",
  },
  {
    name: "space before the offset",
    input: msg({ time: "2023-11-14T22:13:20 +02:00" }),
    reason: badTime,
    appId: "app",
  },
  { name: "US date", input: msg({ time: "11/14/2023" }), reason: badTime, appId: "app" },
  { name: "5-digit year", input: msg({ time: "10000-01-01" }), reason: badTime, appId: "app" },
  {
    name: "offset without time",
    input: msg({ time: "2023-11-14Z" }),
    reason: badTime,
    appId: "app",
  },
  {
    name: "Feb 30",
    input: msg({ time: "2023-02-30" }),
    reason: "invalid time (no such date)",
    appId: "app",
  },
  {
    name: "Feb 29 of a non-leap year",
    input: msg({ time: "2023-02-29T00:00:00Z" }),
    reason: "invalid time (no such date)",
    appId: "app",
  },
  {
    name: "day 00",
    input: msg({ time: "2023-11-00" }),
    reason: "invalid time (no such date)",
    appId: "app",
  },
  {
    name: "April 31",
    input: msg({ time: "2023-04-31" }),
    reason: "invalid time (no such date)",
    appId: "app",
  },
  {
    name: "month 13",
    input: msg({ time: "2023-13-01" }),
    reason: "invalid time (field out of range)",
    appId: "app",
  },
  {
    name: "hour 24",
    input: msg({ time: "2023-11-14T24:00:00Z" }),
    reason: "invalid time (field out of range)",
    appId: "app",
  },
  {
    name: "minute 60",
    input: msg({ time: "2023-11-14T22:60Z" }),
    reason: "invalid time (field out of range)",
    appId: "app",
  },
  {
    name: "leap second 60",
    input: msg({ time: "2016-12-31T23:59:60Z" }),
    reason: "invalid time (field out of range)",
    appId: "app",
  },
  {
    name: "offset +16:00",
    input: msg({ time: "2023-11-14T22:13:20+16:00" }),
    reason: "invalid time (offset out of range)",
    appId: "app",
  },
  {
    name: "milliseconds sent by mistake",
    input: msg({ time: 1700000000250 }),
    reason: "time out of range (milliseconds sent instead of seconds?)",
    appId: "app",
  },
  {
    name: "negative milliseconds sent by mistake",
    input: msg({ time: -1700000000250 }),
    reason: "time out of range (milliseconds sent instead of seconds?)",
    appId: "app",
  },
  {
    name: "microseconds sent by mistake",
    input: msg({ time: 1700000000250000 }),
    reason: yearRange,
    appId: "app",
  },
  {
    // Ambiguous: also 1978 in milliseconds, so it gets the hint.
    name: "year 10000 as a number",
    input: msg({ time: 253402300800 }),
    reason: "time out of range (milliseconds sent instead of seconds?)",
    appId: "app",
  },
  // An ISO string is never milliseconds: no hint (was given one before the fix).
  {
    name: "ISO year 10000 by offset",
    input: msg({ time: "9999-12-31T23:30:00-01:00" }),
    reason: yearRange,
    appId: "app",
  },
  { name: "year 0", input: msg({ time: -62135596801 }), reason: yearRange, appId: "app" },
  {
    name: "ISO year 0000",
    input: msg({ time: "0000-12-31T23:59:59Z" }),
    reason: yearRange,
    appId: "app",
  },
  {
    name: "ISO rounding into year 10000",
    input: msg({ time: "9999-12-31T23:59:59.9999999Z" }),
    reason: yearRange,
    appId: "app",
  },
  {
    name: "offset pushing into year 10000",
    input: msg({ time: "9999-12-31T23:59:59-01:00" }),
    reason: yearRange,
    appId: "app",
  },
  { name: "1e300", input: msg({ time: 1e300 }), reason: yearRange, appId: "app" },
  {
    name: "1e400 (Infinity after JSON.parse)",
    input: '{"app_id":"app","data":{"time":1e400,"payload":{"x":1}}}',
    reason: "invalid time",
    appId: "app",
  },
]);

// ---------------------------------------------------------------------------
// device.

Deno.test('parseMessage device: absent or null → ""; a string is kept exactly, untruncated', () => {
  assert.equal(messageOf(msg({ device: undefined })).readings[0]!.device, "");
  assert.equal(messageOf(msg({ device: null })).readings[0]!.device, "");
  assert.equal(messageOf(msg({ device: 'd"; --é😀' })).readings[0]!.device, 'd"; --é😀');
  assert.equal(messageOf(msg({ device: "d".repeat(500) })).readings[0]!.device, "d".repeat(500));
});

rejectCases("device", [
  {
    name: "number",
    input: msg({ device: 5 }),
    reason: "invalid device (expected string)",
    appId: "app",
  },
  {
    name: "NUL (attributed with U+FFFD)",
    input: msg({ device: "a\0b" }),
    reason: "device contains a NUL character",
    appId: "app",
    device: "a\uFFFDb",
  },
  {
    name: "lone surrogate escape",
    input: '{"app_id":"app","data":{"time":1,"device":"\\udc00","payload":{"x":1}}}',
    reason: "device is not valid Unicode",
    appId: "app",
    device: "\uFFFD",
  },
  {
    name: "attributed with its first 128 characters",
    input: msg({ device: "é".repeat(300), payload: {} }),
    reason: Reasons.emptyPayload,
    appId: "app",
    device: "é".repeat(128),
  },
]);

// ---------------------------------------------------------------------------
// metadata.

Deno.test("parseMessage metadata: values of every scalar type kept in order; absent/null → []", () => {
  const m = messageOf(msg({ metadata: { s: "roof", n: 3.5, t: true, f: false, z: null, e: "" } }));
  assert.deepEqual(m.readings[0]!.metadata, [
    ["s", "roof"],
    ["n", 3.5],
    ["t", true],
    ["f", false],
    ["z", null],
    ["e", ""],
  ]);
  assert.deepEqual(messageOf(msg({ metadata: null })).readings[0]!.metadata, []);
  assert.deepEqual(messageOf(msg({ metadata: {} })).readings[0]!.metadata, []);
});

const hostileNames = [
  "a".repeat(63),
  "é".repeat(21),
  "é".repeat(31) + "a",
  "😀".repeat(15),
  'a"b',
  '"',
  "semi;colon",
  "x -- comment",
  "/* c */",
  "DROP TABLE x;",
  'x"; DROP TABLE x; --',
  "select",
  "user",
  "order",
  "MixedCase",
  "Time", // case matters: not the core column "time"
  "a:b",
];

Deno.test("parseMessage metadata: hostile but valid keys are kept exactly", () => {
  const metadata = hostileNames.map((k, i) => [k, i] as const);
  const m = messageOf(msg({ metadata: Object.fromEntries(metadata) }));
  assert.deepEqual(m.readings[0]!.metadata, metadata);
});

const meta = (metadata: unknown) => msg({ metadata });
rejectCases("metadata", [
  { name: "array", input: meta([]), reason: "invalid metadata (expected object)", appId: "app" },
  { name: "string", input: meta("x"), reason: "invalid metadata (expected object)", appId: "app" },
  { name: "empty key", input: meta({ "": 1 }), reason: "metadata key is empty", appId: "app" },
  {
    name: "key time",
    input: meta({ time: "x" }),
    reason: 'metadata key "time" is reserved',
    appId: "app",
  },
  {
    name: "key metric",
    input: meta({ metric: 1 }),
    reason: 'metadata key "metric" is reserved',
    appId: "app",
  },
  {
    name: "key value",
    input: meta({ value: null }),
    reason: 'metadata key "value" is reserved',
    appId: "app",
  },
  {
    name: "key of 64 bytes",
    input: meta({ ["k".repeat(64)]: 1 }),
    reason: "metadata key is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "key of 32 x é = 64 bytes",
    input: meta({ ["é".repeat(32)]: 1 }),
    reason: "metadata key is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "key of 16 emoji = 64 bytes",
    input: meta({ ["😀".repeat(16)]: 1 }),
    reason: "metadata key is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "key with NUL",
    input: meta({ "a\0": 1 }),
    reason: "metadata key contains a NUL character",
    appId: "app",
  },
  {
    name: "key with a lone surrogate escape",
    input: '{"app_id":"app","data":{"time":1,"metadata":{"\\ud800":1},"payload":{"x":1}}}',
    reason: "metadata key is not valid Unicode",
    appId: "app",
  },
  {
    name: "value with NUL",
    input: meta({ k: "a\0b" }),
    reason: "text contains a NUL character",
    appId: "app",
  },
  {
    name: "value with a lone surrogate escape",
    input: '{"app_id":"app","data":{"time":1,"metadata":{"k":"\\ud800x"},"payload":{"x":1}}}',
    reason: "text is not valid Unicode",
    appId: "app",
  },
  {
    name: "object value",
    input: meta({ k: {} }),
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "array value",
    input: meta({ k: [1] }),
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "1e400 value",
    input: '{"app_id":"app","data":{"time":1,"metadata":{"k":1e400},"payload":{"x":1}}}',
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
]);

// ---------------------------------------------------------------------------
// payload.

Deno.test("parseMessage payload: every scalar type is kept as sent (translate maps them to rows)", () => {
  const m = messageOf(
    msg({ payload: { n: 21.5, i: -3, t: true, f: false, s: "ok", e: "", z: null } }),
  );
  assert.deepEqual(m.readings[0]!.payload, [
    ["n", 21.5],
    ["i", -3],
    ["t", true],
    ["f", false],
    ["s", "ok"],
    ["e", ""],
    ["z", null],
  ]);
});

Deno.test("parseMessage payload: numeric and boolean metrics may be named time, metric or value", () => {
  const m = messageOf(msg({ payload: { time: 1, metric: 2, value: true } }));
  assert.deepEqual(m.readings[0]!.payload, [["time", 1], ["metric", 2], ["value", true]]);
});

Deno.test("parseMessage payload: a numeric metric name is not an identifier (64+ bytes, odd characters OK)", () => {
  const names = ["m".repeat(64), "é".repeat(64), 'a"; DROP TABLE x; --', " "];
  const m = messageOf(msg({ payload: Object.fromEntries(names.map((n) => [n, 1])) }));
  assert.deepEqual(m.readings[0]!.payload, names.map((n) => [n, 1]));
});

Deno.test("parseMessage payload: string metrics with hostile but valid names are kept exactly", () => {
  const payload = hostileNames.map((k) => [k, "v"] as const);
  const m = messageOf(msg({ payload: Object.fromEntries(payload) }));
  assert.deepEqual(m.readings[0]!.payload, payload);
});

/** Numbers as JSON text → the double stored (the nearest one, as PostgreSQL's float8 cast). */
const numbers: Array<[string, number]> = [
  ["9007199254740992", 9007199254740992], // 2^53
  ["9007199254740993", 9007199254740992], // 2^53 + 1: nearest double is 2^53
  ["9007199254740995", 9007199254740996],
  ["-9007199254740993", -9007199254740992],
  ["18446744073709551617", 18446744073709551616], // 2^64 + 1
  ["123456789012345678901234567890", 1.2345678901234568e29],
  ["1.7976931348623157e308", Number.MAX_VALUE],
  ["5e-324", Number.MIN_VALUE],
  ["1e-400", 0], // underflows to 0 (PostgreSQL's own float8 input would raise instead)
  ["-0", -0],
  ["0.1", 0.1],
  ["1E2", 100],
];
for (const [text, expected] of numbers) {
  Deno.test(`parseMessage payload number ${text} → ${Object.is(expected, -0) ? "-0" : expected}`, () => {
    const m = messageOf(`{"app_id":"a","data":{"time":1,"payload":{"x":${text}}}}`);
    const got = m.readings[0]!.payload[0]![1];
    assert.ok(Object.is(got, expected), `${text} gave ${got}`);
  });
}

const pay = (payload: unknown) => msg({ payload });
rejectCases("payload", [
  { name: "missing", input: pay(undefined), reason: Reasons.emptyPayload, appId: "app" },
  { name: "null", input: pay(null), reason: Reasons.emptyPayload, appId: "app" },
  { name: "empty object", input: pay({}), reason: Reasons.emptyPayload, appId: "app" },
  { name: "array", input: pay([1]), reason: Reasons.objectForPrimitive, appId: "app" },
  { name: "empty array", input: pay([]), reason: Reasons.objectForPrimitive, appId: "app" },
  { name: "string", input: pay("x"), reason: Reasons.objectForPrimitive, appId: "app" },
  { name: "number", input: pay(5), reason: Reasons.objectForPrimitive, appId: "app" },
  {
    name: "object value",
    input: pay({ a: 1, b: { c: 1 } }),
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "array value",
    input: pay({ a: [1, 2] }),
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "empty object value",
    input: pay({ a: {} }),
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "1e400 (Infinity)",
    input: '{"app_id":"app","data":{"time":1,"payload":{"x":1e400}}}',
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "-1e400 (-Infinity)",
    input: '{"app_id":"app","data":{"time":1,"payload":{"x":-1e400}}}',
    reason: Reasons.objectForPrimitive,
    appId: "app",
  },
  {
    name: "string metric named time",
    input: pay({ time: "x" }),
    reason: 'string metric "time" is reserved',
    appId: "app",
  },
  {
    name: "string metric named metric",
    input: pay({ metric: "x" }),
    reason: 'string metric "metric" is reserved',
    appId: "app",
  },
  {
    name: "string metric named value",
    input: pay({ value: "" }),
    reason: 'string metric "value" is reserved',
    appId: "app",
  },
  {
    name: "string metric of 64 bytes",
    input: pay({ ["s".repeat(64)]: "x" }),
    reason: "string metric is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "string metric of 32 x é",
    input: pay({ ["é".repeat(32)]: "x" }),
    reason: "string metric is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "string metric of 16 emoji",
    input: pay({ ["😀".repeat(16)]: "x" }),
    reason: "string metric is 64 bytes long (PostgreSQL allows 63)",
    appId: "app",
  },
  {
    name: "string metric with empty name",
    input: pay({ "": "x" }),
    reason: "string metric is empty",
    appId: "app",
  },
  {
    name: "string metric name with NUL",
    input: pay({ "a\0": "x" }),
    reason: "string metric contains a NUL character",
    appId: "app",
  },
  {
    name: "numeric metric with empty name",
    input: pay({ "": 1 }),
    reason: "metric name is empty",
    appId: "app",
  },
  {
    name: "numeric metric name with NUL",
    input: pay({ "a\0": 1 }),
    reason: "metric name contains a NUL character",
    appId: "app",
  },
  {
    name: "numeric metric name with a lone surrogate escape",
    input: '{"app_id":"app","data":{"time":1,"payload":{"\\udfff":1}}}',
    reason: "metric name is not valid Unicode",
    appId: "app",
  },
  {
    name: "string value with NUL",
    input: pay({ s: "a\0" }),
    reason: "text contains a NUL character",
    appId: "app",
  },
  {
    name: "string value with a lone surrogate escape",
    input: '{"app_id":"app","data":{"time":1,"payload":{"s":"\\ud800"}}}',
    reason: "text is not valid Unicode",
    appId: "app",
  },
]);

// ---------------------------------------------------------------------------
// safeText (error attribution).

Deno.test("safeText: NUL → U+FFFD, lone surrogates → U+FFFD, cut at maxChars code points", () => {
  assert.equal(safeText("a\0b"), "a\uFFFDb");
  assert.equal(safeText("x\ud800y"), "x\uFFFDy");
  assert.equal(safeText("😀".repeat(200)), "😀".repeat(128));
  assert.equal(safeText("abcdef", 3), "abc");
  assert.equal(safeText(""), "");
});

// ---------------------------------------------------------------------------
// Property: arbitrary strings and doubles never make parseMessage throw, and
// it accepts exactly what an independent oracle says is storable, with the
// values it was sent.

const bytesOf = (s: string) => enc.encode(s).length;
const badText = (s: string) => s.includes("\0") || !s.isWellFormed();
const badIdent = (s: string) => s === "" || badText(s) || bytesOf(s) > 63;
const reserved = (s: string) => s === "time" || s === "metric" || s === "value";

/** Well-formed, NUL-free pieces, biased towards the characters that matter here. */
const clean = fc.oneof(
  { weight: 3, arbitrary: fc.string({ unit: "grapheme", minLength: 1, maxLength: 1 }) },
  { weight: 2, arbitrary: fc.constantFrom('"', "\\", ":", "{", "[", "é", "😀", "a", "time", "\n") },
);
/** Any code point, NUL and lone surrogates. */
const hostile = fc.oneof(
  fc.string({ unit: "binary", minLength: 1, maxLength: 1 }),
  fc.constantFrom("\0", "\ud800", "\udfff"),
);
const strOf = (minLength: number) =>
  fc.oneof(
    { weight: 14, arbitrary: fc.string({ unit: clean, minLength, maxLength: 30 }) },
    {
      weight: 1,
      arbitrary: fc.string({ unit: fc.oneof(clean, hostile), minLength, maxLength: 30 }),
    },
  );
const str = strOf(0);
const name = fc.oneof(
  { weight: 20, arbitrary: strOf(1) },
  {
    weight: 1,
    arbitrary: fc.constantFrom(
      "",
      "time",
      "metric",
      "value",
      "__proto__",
      "a".repeat(63),
      "a".repeat(64),
      "é".repeat(32),
    ),
  },
);
const scalarArb = fc.oneof(str, fc.double(), fc.boolean(), fc.constant(null));
const entries = fc.array(fc.tuple(name, scalarArb), { maxLength: 6 });

/** What JSON.stringify + JSON.parse turns a sent scalar into (NaN/±Infinity → null, -0 → 0). */
function onWire(v: Scalar): Scalar {
  if (typeof v !== "number") return v;
  if (!Number.isFinite(v)) return null;
  return Object.is(v, -0) ? 0 : v;
}

Deno.test("property: parseMessage(JSON.stringify(msg)) is exact IR or a reasoned rejection, never a throw", () => {
  let runs = 0, accepted = 0;
  fc.assert(
    fc.property(
      name,
      fc.option(str),
      entries,
      entries,
      fc.integer({ min: 0, max: 4_000_000_000 }),
      fc.integer({ min: 0, max: 999_999 }),
      (appId, device, metaEntries, payEntries, seconds, micros) => {
        const metadata = Object.fromEntries(metaEntries);
        const payload = Object.fromEntries(payEntries);
        const time = seconds + micros / 1e6;
        const sent = { app_id: appId, data: { time, device, metadata, payload } };
        const expectReject = badIdent(appId) ||
          (device !== null && badText(device)) ||
          Object.entries(metadata).some(([k, v]) =>
            badIdent(k) || reserved(k) || (typeof v === "string" && badText(v))
          ) ||
          Object.keys(payload).length === 0 ||
          Object.entries(payload).some(([k, v]) =>
            typeof v === "string"
              ? badIdent(k) || reserved(k) || badText(v)
              : k === "" || badText(k)
          );

        const r = parseMessage(enc.encode(JSON.stringify(sent)));
        runs++;
        if (!r.ok) {
          assert.equal(typeof r.rejection.reason, "string");
          assert.ok(r.rejection.reason.length > 0);
          assert.ok(expectReject, `unexpected rejection ${r.rejection.reason}`);
          return;
        }
        assert.ok(!expectReject, "accepted a message the oracle rejects");
        accepted++;
        const iso = new Date(seconds * 1000).toISOString().slice(0, 19) + "." +
          String(micros).padStart(6, "0") + "Z";
        assert.deepEqual(r.message, {
          appId,
          readings: [{
            time: iso,
            device: device ?? "",
            metadata: Object.entries(metadata).map(([k, v]) => [k, onWire(v)]),
            payload: Object.entries(payload).map(([k, v]) => [k, onWire(v)]),
          }],
        });
      },
    ),
    { numRuns: 3000 },
  );
  // Not vacuous: a good share of the generated messages is storable (about 45%).
  assert.ok(accepted > runs / 5, `only ${accepted} of ${runs} accepted`);
});
