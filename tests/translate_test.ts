/**
 * lib/translate.ts: IR + TableInfo → row groups and parameterized INSERTs,
 * or the user's error string. Pure; every case asserts exact groups, exact
 * SQL text or the exact rejection.
 */
import assert from "node:assert/strict";
import { type IrMessage, parseMessage, type Reading } from "../lib/ir.ts";
import { Reasons } from "../lib/rejection.ts";
import {
  buildInsert,
  type ColumnInfo,
  type ColumnKind,
  groupKey,
  isAppTable,
  mergeInto,
  type RowGroup,
  type TableInfo,
  translate,
  type Translation,
} from "../lib/translate.ts";

type ColSpec = ColumnKind | [ColumnKind, number];

function cols(spec: Record<string, ColSpec>): Map<string, ColumnInfo> {
  return new Map(
    Object.entries(spec).map(([name, s]) => {
      const [kind, maxChars] = typeof s === "string" ? [s, null] : s;
      return [name, { kind, maxChars }];
    }),
  );
}

const CORE: Record<string, ColSpec> = {
  time: "timestamp",
  metric: ["text", 128],
  value: "number",
};

/** An app table (time, metric varchar(128), value) plus `extra` columns. */
function appTable(
  extra: Record<string, ColSpec> = {},
  table = "app",
  schema = "public",
): TableInfo {
  return { schema, table, columns: cols({ ...CORE, ...extra }) };
}

const T = "2023-11-14T22:13:20.000000Z";

/** IR built directly (translate trusts IR types). */
function ir(readings: Array<Partial<Reading>>, appId = "app"): IrMessage {
  return {
    appId,
    readings: readings.map((r) => ({ time: T, device: "", metadata: [], payload: [], ...r })),
  };
}

/** IR parsed from a JSON message, as the writer does it. */
function parsed(message: unknown): IrMessage {
  const r = parseMessage(new TextEncoder().encode(JSON.stringify(message)));
  if (!r.ok) assert.fail(`parse rejected: ${r.rejection.reason}`);
  return r.message;
}

function groupsOf(t: Translation): RowGroup[] {
  if (!t.ok) assert.fail(`expected groups, got ${JSON.stringify(t.rejection)}`);
  return t.groups;
}

/** Groups without the TableInfo, for compact exact comparisons. */
function plain(t: Translation): unknown {
  if (!t.ok) assert.fail(`expected groups, got ${JSON.stringify(t.rejection)}`);
  return {
    rows: t.rows,
    groups: t.groups.map(({ key, columns, times, metrics, values, cells }) => ({
      key,
      columns,
      times,
      metrics,
      values,
      cells,
    })),
  };
}

function rejected(
  t: Translation,
): { reason: string; appId: string; device: string; missingColumn: boolean } {
  if (t.ok) assert.fail(`expected a rejection, got ${JSON.stringify(plain(t))}`);
  return { ...t.rejection, missingColumn: t.missingColumn };
}

const key = (...columns: string[]) => ["public", "app", ...columns].join("\0");

// ---------------------------------------------------------------------------
// SPEC section 2: one payload entry → one row.

Deno.test("SPEC 2: a finite number becomes value", () => {
  const t = translate(ir([{ payload: [["temperature", 21.5], ["n", -3], ["z", 0]] }]), appTable());
  assert.deepEqual(plain(t), {
    rows: 3,
    groups: [{
      key: key(),
      columns: [],
      times: [T, T, T],
      metrics: ["temperature", "n", "z"],
      values: [21.5, -3, 0],
      cells: [],
    }],
  });
});

Deno.test("SPEC 2: booleans become 1 and 0", () => {
  const t = translate(ir([{ payload: [["on", true], ["off", false]] }]), appTable());
  assert.deepEqual(plain(t), {
    rows: 2,
    groups: [{
      key: key(),
      columns: [],
      times: [T, T],
      metrics: ["on", "off"],
      values: [1, 0],
      cells: [],
    }],
  });
});

Deno.test("SPEC 2: a string becomes value 0 and the text in the metric's own column", () => {
  const t = translate(ir([{ payload: [["status", "ok"]] }]), appTable({ status: ["text", 128] }));
  assert.deepEqual(plain(t), {
    rows: 1,
    groups: [{
      key: key("status"),
      columns: ["status"],
      times: [T],
      metrics: ["status"],
      values: [0],
      cells: [["ok"]],
    }],
  });
});

Deno.test("SPEC 2: a string metric wins over a metadata key of the same name (for its own row)", () => {
  const msg = ir([{
    metadata: [["status", "from-metadata"]],
    payload: [["t", 1], ["status", "ok"]],
  }]);
  const t = translate(msg, appTable({ status: ["text", 128] }));
  assert.deepEqual(plain(t), {
    rows: 2,
    groups: [{
      key: key("status"),
      columns: ["status"],
      times: [T, T],
      metrics: ["t", "status"],
      values: [1, 0],
      cells: [["from-metadata", "ok"]],
    }],
  });
});

Deno.test("SPEC 2: null gives no row; a payload of only nulls gives no rows at all", () => {
  const t = translate(ir([{ payload: [["a", null], ["b", 2]] }]), appTable());
  assert.deepEqual(plain(t), {
    rows: 1,
    groups: [{ key: key(), columns: [], times: [T], metrics: ["b"], values: [2], cells: [] }],
  });
  assert.deepEqual(plain(translate(ir([{ payload: [["a", null]] }]), appTable())), {
    rows: 0,
    groups: [],
  });
});

Deno.test("SPEC 2: object, array or non-finite payload values reject the whole blob (at parse)", () => {
  for (const text of ['{"x":1,"o":{}}', '{"x":1,"a":[1]}', '{"x":1,"i":1e400}']) {
    const r = parseMessage(
      new TextEncoder().encode(`{"app_id":"app","data":{"time":1,"payload":${text}}}`),
    );
    assert.deepEqual(r, {
      ok: false,
      rejection: { reason: "unexpected object (expected primitive)", appId: "app", device: "" },
    });
  }
});

Deno.test("SPEC 2: every metadata value is carried by every row of its blob", () => {
  const msg = parsed({
    app_id: "app",
    data: {
      time: 1700000000,
      device: "station-7",
      metadata: { site: "roof", floor: 3 },
      payload: { temperature: 21.5, humidity: 40, status: "ok" },
    },
  });
  const t = translate(
    msg,
    appTable({ site: ["text", 128], floor: "number", status: ["text", 128] }),
  );
  assert.deepEqual(plain(t), {
    rows: 3,
    groups: [
      {
        key: key("floor", "site"),
        columns: ["floor", "site"],
        times: [T, T],
        metrics: ["temperature", "humidity"],
        values: [21.5, 40],
        cells: [[3, 3], ["roof", "roof"]],
      },
      {
        key: key("floor", "site", "status"),
        columns: ["floor", "site", "status"],
        times: [T],
        metrics: ["status"],
        values: [0],
        cells: [[3], ["roof"], ["ok"]],
      },
    ],
  });
});

Deno.test("SPEC 2: all rows of a message are written atomically: one bad reading rejects all", () => {
  const msg = ir([
    { device: "d1", payload: [["x", 1]] },
    { device: "d2", metadata: [["nope", 1]], payload: [["x", 2]] },
    { device: "d3", payload: [["x", 3]] },
  ]);
  assert.deepEqual(rejected(translate(msg, appTable())), {
    reason: "invalid metadata",
    appId: "app",
    device: "d2",
    missingColumn: true,
  });
});

// ---------------------------------------------------------------------------
// SPEC section 4: the user-facing errors, byte for byte.

const errorTable: TableInfo = {
  schema: "public",
  table: "errorTable",
  columns: cols({
    app_id: ["text", 128],
    error: ["text", 128],
    device: ["text", 128],
    timestamp: "timestamp",
  }),
};

const notApps: Array<[string, TableInfo | null]> = [
  ["missing table", null],
  ["errorTable", errorTable],
  ["no value column", {
    schema: "public",
    table: "app",
    columns: cols({ time: "timestamp", metric: "text" }),
  }],
  ["value is text", {
    schema: "public",
    table: "app",
    columns: cols({ time: "timestamp", metric: "text", value: "text" }),
  }],
  ["time is a number", {
    schema: "public",
    table: "app",
    columns: cols({ time: "number", metric: "text", value: "number" }),
  }],
  ["metric is a number", {
    schema: "public",
    table: "app",
    columns: cols({ time: "timestamp", metric: "number", value: "number" }),
  }],
  ["Time/Metric/Value in another case", {
    schema: "public",
    table: "app",
    columns: cols({ Time: "timestamp", Metric: "text", Value: "number" }),
  }],
];
for (const [name, table] of notApps) {
  Deno.test(`SPEC 4: "invalid app": ${name}`, () => {
    assert.equal(table === null ? false : isAppTable(table), false);
    const msg = ir([{ device: "dev", payload: [["x", 1]] }], "errorTable");
    assert.deepEqual(rejected(translate(msg, table)), {
      reason: "invalid app",
      appId: "errorTable",
      device: "dev",
      missingColumn: false,
    });
  });
}

Deno.test("isAppTable: time timestamp + metric text + value number, any extras", () => {
  assert.equal(isAppTable(appTable()), true);
  assert.equal(isAppTable(appTable({ site: "text", x: "other" })), true);
});

interface RejectCase {
  name: string;
  table: TableInfo;
  reading: Partial<Reading>;
  reason: string;
  missingColumn?: boolean;
}

function rejectCases(group: string, cases: RejectCase[]): void {
  for (const c of cases) {
    Deno.test(`translate rejects (${group}): ${c.name}`, () => {
      assert.deepEqual(rejected(translate(ir([{ device: "dev", ...c.reading }]), c.table)), {
        reason: c.reason,
        appId: "app",
        device: "dev",
        missingColumn: c.missingColumn ?? false,
      });
    });
  }
}

rejectCases("SPEC 4", [
  {
    name: "metadata key with no such column",
    table: appTable(),
    reading: { metadata: [["site", "roof"]], payload: [["x", 1]] },
    reason: "invalid metadata",
    missingColumn: true,
  },
  {
    name: "metadata key with no such column, even with a null value",
    table: appTable(),
    reading: { metadata: [["site", null]], payload: [["x", 1]] },
    reason: "invalid metadata",
    missingColumn: true,
  },
  {
    name: "string metric with no such column",
    table: appTable(),
    reading: { payload: [["x", 1], ["status", "ok"]] },
    reason: "invalid metadata",
    missingColumn: true,
  },
  {
    name: "metadata column names are case-sensitive",
    table: appTable({ site: "text" }),
    reading: { metadata: [["Site", "roof"]], payload: [["x", 1]] },
    reason: "invalid metadata",
    missingColumn: true,
  },
  {
    name: "metadata string into a number column",
    table: appTable({ floor: "number" }),
    reading: { metadata: [["floor", "3"]], payload: [["x", 1]] },
    reason: "unexpected string (expected number)",
  },
  {
    name: "string metric into a number column",
    table: appTable({ status: "number" }),
    reading: { payload: [["status", "ok"]] },
    reason: "unexpected string (expected number)",
  },
  {
    name: "metadata boolean into a number column",
    table: appTable({ flag: "number" }),
    reading: { metadata: [["flag", true]], payload: [["x", 1]] },
    reason: "unexpected boolean (expected number)",
  },
  {
    name: "metadata false into a number column",
    table: appTable({ flag: "number" }),
    reading: { metadata: [["flag", false]], payload: [["x", 1]] },
    reason: "unexpected boolean (expected number)",
  },
]);

Deno.test("SPEC 4: empty or missing payload (at parse)", () => {
  for (const data of [{ time: 1 }, { time: 1, payload: {} }, { time: 1, payload: null }]) {
    const r = parseMessage(new TextEncoder().encode(JSON.stringify({ app_id: "app", data })));
    assert.deepEqual(r, {
      ok: false,
      rejection: {
        reason: "assertion failure: received empty payload (no metrics)",
        appId: "app",
        device: "",
      },
    });
  }
  assert.equal(Reasons.emptyPayload, "assertion failure: received empty payload (no metrics)");
});

// ---------------------------------------------------------------------------
// Column types and limits.

Deno.test("a number into a text column is stored as its JavaScript string", () => {
  const values: Array<[number, string]> = [
    [3.5, "3.5"],
    [3, "3"],
    [-0, "0"],
    [0.1, "0.1"],
    [1.5e-300, "1.5e-300"],
    [5e-324, "5e-324"],
    [9007199254740991, "9007199254740991"], // 2^53 - 1: the largest exact integer
  ];
  for (const [n, s] of values) {
    const t = translate(
      ir([{ metadata: [["site", n]], payload: [["x", 1]] }]),
      appTable({ site: ["text", 128] }),
    );
    assert.deepEqual(groupsOf(t)[0]!.cells, [[s]], `${n}`);
  }
});

Deno.test("an integer beyond 2^53 is refused where its digits would be kept (text, integer columns)", () => {
  // JSON.parse has already rounded 9007199254740993 to ...992: storing that in a text
  // or bigint column (a device serial, say) would file it under another number.
  const exactCols = new Map<string, ColumnInfo>([
    ...cols(CORE),
    ["site", { kind: "text", maxChars: 128 }],
    ["big", {
      kind: "number",
      maxChars: null,
      intRange: { type: "bigint", min: -9223372036854775808, max: 9223372036854775807 },
    }],
    ["dbl", { kind: "number", maxChars: null }],
  ]);
  const table = { schema: "public", table: "app", columns: exactCols };
  for (const column of ["site", "big"]) {
    for (const n of [9007199254740993, -9007199254740993, 1e21]) {
      const t = translate(ir([{ metadata: [[column, n]], payload: [["x", 1]] }]), table);
      assert.deepEqual(
        t.ok ? null : t.rejection.reason,
        `number beyond 2^53 cannot be stored exactly in column "${column}"` +
          (column === "site" ? " (send it as a string)" : ""),
        `${column} ${n}`,
      );
    }
    const ok = translate(
      ir([{ metadata: [[column, 9007199254740991]], payload: [["x", 1]] }]),
      table,
    );
    assert.ok(ok.ok, `${column}: 2^53 - 1 is exact`);
  }
  // A double precision column holds the double itself: nothing is lost.
  const dbl = translate(
    ir([{ metadata: [["dbl", 9007199254740993]], payload: [["x", 1]] }]),
    table,
  );
  assert.deepEqual(groupsOf(dbl)[0]!.cells, [[9007199254740992]]);
});

Deno.test("integer columns: values PostgreSQL would refuse are rejected before the insert", () => {
  const columns = new Map<string, ColumnInfo>([
    ...cols(CORE),
    ["s", {
      kind: "number",
      maxChars: null,
      intRange: { type: "smallint", min: -32768, max: 32767 },
    }],
  ]);
  const table = { schema: "public", table: "app", columns };
  const reason = (n: number) => {
    const t = translate(ir([{ metadata: [["s", n]], payload: [["x", 1]] }]), table);
    return t.ok ? "ok" : t.rejection.reason;
  };
  for (const n of [32767, -32768, 3.7, 32767.4, -32768.4]) assert.equal(reason(n), "ok", `${n}`);
  for (const n of [32768, -32769, 32767.5, 1e10]) {
    assert.equal(reason(n), 'value out of range for column "s" (smallint)', `${n}`);
  }
});

Deno.test('a boolean into a text column is stored as "true" / "false"', () => {
  const msg = ir([{ metadata: [["a", true], ["b", false]], payload: [["x", 1]] }]);
  const t = translate(msg, appTable({ a: ["text", 128], b: "text" }));
  assert.deepEqual(groupsOf(t)[0]!.cells, [["true"], ["false"]]);
});

Deno.test("null metadata is a NULL cell in any column kind it names", () => {
  const msg = ir([{
    metadata: [["n", null], ["s", null], ["b", null], ["o", null]],
    payload: [["x", 1]],
  }]);
  const t = translate(msg, appTable({ n: "number", s: "text", b: "boolean", o: "other" }));
  assert.deepEqual(groupsOf(t)[0]!.columns, ["b", "n", "o", "s"]);
  assert.deepEqual(groupsOf(t)[0]!.cells, [[null], [null], [null], [null]]);
});

Deno.test("a boolean column takes booleans as booleans", () => {
  const t = translate(
    ir([{ metadata: [["ok", true], ["ko", false]], payload: [["x", 1]] }]),
    appTable({ ok: "boolean", ko: "boolean" }),
  );
  assert.deepEqual(groupsOf(t)[0]!.cells, [[false], [true]]); // columns sorted: ko, ok
});

Deno.test("text exactly at the varchar(n) limit, counted in code points, is accepted", () => {
  for (const s of ["a".repeat(128), "é".repeat(128), "😀".repeat(128), "👍🏽".repeat(64)]) {
    const meta = translate(
      ir([{ metadata: [["k", s]], payload: [["x", 1]] }]),
      appTable({ k: ["text", 128] }),
    );
    assert.deepEqual(groupsOf(meta)[0]!.cells, [[s]]);
    const str = translate(ir([{ payload: [["k", s]] }]), appTable({ k: ["text", 128] }));
    assert.deepEqual(groupsOf(str)[0]!.cells, [[s]]);
  }
});

Deno.test("a text column without a limit takes long text", () => {
  const s = "x".repeat(100_000);
  const t = translate(ir([{ metadata: [["k", s]], payload: [["x", 1]] }]), appTable({ k: "text" }));
  assert.deepEqual(groupsOf(t)[0]!.cells, [[s]]);
});

rejectCases("types and limits", [
  {
    name: "129 ASCII characters into varchar(128)",
    table: appTable({ k: ["text", 128] }),
    reading: { metadata: [["k", "a".repeat(129)]], payload: [["x", 1]] },
    reason: 'value too long for column "k" (max 128 characters)',
  },
  {
    name: "129 emoji into varchar(128) (258 UTF-16 units, 516 bytes)",
    table: appTable({ k: ["text", 128] }),
    reading: { metadata: [["k", "😀".repeat(129)]], payload: [["x", 1]] },
    reason: 'value too long for column "k" (max 128 characters)',
  },
  {
    name: "string metric of 129 characters into varchar(128)",
    table: appTable({ s: ["text", 128] }),
    reading: { payload: [["s", "é".repeat(129)]] },
    reason: 'value too long for column "s" (max 128 characters)',
  },
  {
    name: "number whose string is longer than varchar(3)",
    table: appTable({ k: ["text", 3] }),
    reading: { metadata: [["k", 1234]], payload: [["x", 1]] },
    reason: 'value too long for column "k" (max 3 characters)',
  },
  {
    name: "boolean longer than varchar(4)",
    table: appTable({ k: ["text", 4] }),
    reading: { metadata: [["k", false]], payload: [["x", 1]] },
    reason: 'value too long for column "k" (max 4 characters)',
  },
  {
    name: "metric name of 129 characters (metric is varchar(128))",
    table: appTable(),
    reading: { payload: [["m".repeat(129), 1]] },
    reason: "metric name too long (max 128 characters)",
  },
  {
    name: "metric name of 129 emoji",
    table: appTable(),
    reading: { payload: [["😀".repeat(129), 1]] },
    reason: "metric name too long (max 128 characters)",
  },
  {
    name: "metric name too long for a varchar(16) metric column",
    table: { schema: "public", table: "app", columns: cols({ ...CORE, metric: ["text", 16] }) },
    reading: { payload: [["m".repeat(17), 1]] },
    reason: "metric name too long (max 16 characters)",
  },
  {
    name: "a null metric is not checked, but the next one is",
    table: appTable(),
    reading: { payload: [["m".repeat(200), null], ["n".repeat(129), 1]] },
    reason: "metric name too long (max 128 characters)",
  },
  {
    name: "number into a boolean column",
    table: appTable({ b: "boolean" }),
    reading: { metadata: [["b", 1]], payload: [["x", 1]] },
    reason: "unexpected number (expected boolean)",
  },
  {
    name: "string into a boolean column",
    table: appTable({ b: "boolean" }),
    reading: { metadata: [["b", "true"]], payload: [["x", 1]] },
    reason: "unexpected string (expected boolean)",
  },
  {
    name: "string metric into a boolean column",
    table: appTable({ b: "boolean" }),
    reading: { payload: [["b", "yes"]] },
    reason: "unexpected string (expected boolean)",
  },
  {
    name: "metadata into a timestamp column",
    table: appTable({ ts: "timestamp" }),
    reading: { metadata: [["ts", "2023-11-14"]], payload: [["x", 1]] },
    reason: 'unsupported column type for "ts"',
  },
  {
    name: "string metric into a column of another type",
    table: appTable({ j: "other" }),
    reading: { payload: [["j", "{}"]] },
    reason: 'unsupported column type for "j"',
  },
]);

Deno.test("metric names of exactly 128 characters (any width) are accepted", () => {
  for (const m of ["m".repeat(128), "😀".repeat(128)]) {
    assert.deepEqual(groupsOf(translate(ir([{ payload: [[m, 1]] }]), appTable()))[0]!.metrics, [m]);
  }
  const unlimited = { schema: "public", table: "app", columns: cols({ ...CORE, metric: "text" }) };
  const long = "m".repeat(10_000);
  assert.deepEqual(groupsOf(translate(ir([{ payload: [[long, 1]] }]), unlimited))[0]!.metrics, [
    long,
  ]);
});

// ---------------------------------------------------------------------------
// Grouping and merging.

Deno.test("rows with different column sets land in different groups, columns sorted", () => {
  const msg = ir([
    { metadata: [["site", "roof"]], payload: [["t", 1], ["status", "ok"], ["mode", "auto"]] },
    { metadata: [["site", "cellar"]], payload: [["t", 2]] },
  ]);
  const t = translate(msg, appTable({ site: "text", status: "text", mode: "text" }));
  assert.deepEqual(plain(t), {
    rows: 4,
    groups: [
      {
        key: key("site"),
        columns: ["site"],
        times: [T, T],
        metrics: ["t", "t"],
        values: [1, 2],
        cells: [["roof", "cellar"]],
      },
      {
        key: key("site", "status"),
        columns: ["site", "status"],
        times: [T],
        metrics: ["status"],
        values: [0],
        cells: [["roof"], ["ok"]],
      },
      {
        key: key("mode", "site"),
        columns: ["mode", "site"],
        times: [T],
        metrics: ["mode"],
        values: [0],
        cells: [["auto"], ["roof"]],
      },
    ],
  });
});

Deno.test("metadata order does not matter: equal column sets share one group, cells aligned", () => {
  const msg = ir([
    { metadata: [["b", "b1"], ["a", 1]], payload: [["x", 1]] },
    { time: "2023-11-14T22:13:21.000000Z", metadata: [["a", 2], ["b", "b2"]], payload: [["x", 2]] },
  ]);
  const t = translate(msg, appTable({ a: "number", b: "text" }));
  assert.deepEqual(plain(t), {
    rows: 2,
    groups: [{
      key: key("a", "b"),
      columns: ["a", "b"],
      times: [T, "2023-11-14T22:13:21.000000Z"],
      metrics: ["x", "x"],
      values: [1, 2],
      cells: [[1, 2], ["b1", "b2"]],
    }],
  });
});

Deno.test("groupKey: schema, table and column set; never ambiguous", () => {
  const t = appTable();
  assert.equal(groupKey(t, ["a", "b"]), "public\0app\0a\0b");
  assert.notEqual(groupKey(t, ["a,b"]), groupKey(t, ["a", "b"]));
  assert.notEqual(groupKey(appTable({}, "app", "other"), []), groupKey(t, []));
  assert.notEqual(groupKey(appTable({}, "app2"), []), groupKey(t, []));
});

Deno.test("groups with equal keys from two messages merge via mergeInto", () => {
  const table = appTable({ site: "text" });
  const a = groupsOf(
    translate(ir([{ metadata: [["site", "a"]], payload: [["x", 1], ["y", 2]] }]), table),
  );
  const b = groupsOf(
    translate(ir([{ metadata: [["site", "b"]], payload: [["z", 3]] }], "app"), table),
  );
  assert.equal(a[0]!.key, b[0]!.key);
  mergeInto(a[0]!, b[0]!);
  assert.deepEqual(
    { times: a[0]!.times, metrics: a[0]!.metrics, values: a[0]!.values, cells: a[0]!.cells },
    { times: [T, T, T], metrics: ["x", "y", "z"], values: [1, 2, 3], cells: [["a", "a", "b"]] },
  );
  // src is untouched.
  assert.deepEqual(b[0]!.metrics, ["z"]);
});

Deno.test("mergeInto handles a 300,000-row group (no argument spread: it used to overflow the stack)", () => {
  const table = appTable({ site: "text" });
  const n = 300_000;
  const payload = Array.from({ length: n }, (_, i) => [`m${i}`, i] as const);
  const big = groupsOf(translate(ir([{ metadata: [["site", "s"]], payload }]), table))[0]!;
  const dst = groupsOf(
    translate(ir([{ metadata: [["site", "d"]], payload: [["first", -1]] }]), table),
  )[0]!;
  mergeInto(dst, big);
  assert.equal(dst.times.length, n + 1);
  assert.equal(dst.metrics[n], `m${n - 1}`);
  assert.equal(dst.values[n], n - 1);
  assert.equal(dst.cells[0]!.length, n + 1);
  assert.equal(dst.cells[0]![0], "d");
  assert.equal(dst.cells[0]![n], "s");
});

// ---------------------------------------------------------------------------
// buildInsert: values only as parameters, identifiers only quoted.

Deno.test("buildInsert: exact SQL for the core columns", () => {
  const g = groupsOf(translate(ir([{ payload: [["x", 1]] }]), appTable()))[0]!;
  assert.deepEqual(buildInsert(g), {
    text: 'INSERT INTO "public"."app" ("time", "metric", "value") ' +
      "SELECT c0::timestamptz, c1, c2 FROM unnest($1::text[], $2::text[], $3::float8[]) AS u(c0, c1, c2)",
    values: [[T], ["x"], [1]],
  });
});

Deno.test("buildInsert: one array parameter per extra column, typed by column kind", () => {
  const msg = ir([{
    metadata: [["site", "roof"], ["floor", 3], ["ok", true]],
    payload: [["x", 1]],
  }]);
  const g = groupsOf(
    translate(msg, appTable({ site: "text", floor: "number", ok: "boolean" })),
  )[0]!;
  assert.deepEqual(buildInsert(g), {
    text: 'INSERT INTO "public"."app" ("time", "metric", "value", "floor", "ok", "site") ' +
      "SELECT c0::timestamptz, c1, c2, c3, c4, c5 " +
      "FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::bool[], $6::text[]) " +
      "AS u(c0, c1, c2, c3, c4, c5)",
    values: [[T], ["x"], [1], [3], [true], ["roof"]],
  });
});

/** Identifiers that must survive quoting exactly; all are valid (≤ 63 bytes, no NUL). */
const hostileColumns = [
  'a"b',
  '"',
  '""',
  "semi;colon",
  "x -- comment",
  "/* c */",
  "DROP TABLE x;",
  'x"); DROP TABLE app; --',
  "select",
  "user",
  "order",
  "MixedCase",
  "Time",
  "é".repeat(31) + "a",
  "😀".repeat(15),
  "$1",
  "a\nb",
];
const hostileValues = [
  "'); DROP TABLE app; --",
  "' OR '1'='1",
  '"; DROP TABLE app; --',
  "$1",
  "/*",
  "\\",
  "😀",
];

Deno.test("buildInsert: hostile identifiers are only ever double-quoted, values never in the text", () => {
  const schema = 's"x';
  const tableName = 'T"; DROP TABLE t; --';
  const extra: Record<string, ColSpec> = {};
  for (const c of hostileColumns) extra[c] = "text";
  const table = appTable(extra, tableName, schema);
  // Each value carries a unique prefix, so finding it in the text can only mean a leaked value.
  const metadata = hostileColumns.map((c, i) =>
    [c, `v${i}:${hostileValues[i % hostileValues.length]!}`] as const
  );
  // Through the real parser, so these names are what a message can carry.
  const msg = parsed({
    app_id: tableName,
    data: { time: 1700000000, metadata: Object.fromEntries(metadata), payload: { "'; --": 1 } },
  });
  const groups = groupsOf(translate(msg, table));
  assert.equal(groups.length, 1);
  const stmt = buildInsert(groups[0]!);

  const sorted = [...hostileColumns].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const q = (s: string) => '"' + s.replaceAll('"', '""') + '"';
  const n = 3 + sorted.length;
  const aliases = Array.from({ length: n }, (_, i) => `c${i}`);
  const params = ["$1::text[]", "$2::text[]", "$3::float8[]"];
  for (let i = 4; i <= n; i++) params.push(`$${i}::text[]`);
  assert.equal(
    stmt.text,
    `INSERT INTO "s""x"."T""; DROP TABLE t; --" (${
      ["time", "metric", "value", ...sorted].map(q).join(", ")
    }) ` +
      `SELECT c0::timestamptz, ${aliases.slice(1).join(", ")} FROM unnest(${params.join(", ")}) ` +
      `AS u(${aliases.join(", ")})`,
  );
  assert.equal(stmt.values.length, n);
  assert.deepEqual(stmt.values.slice(0, 3), [[T], ["'; --"], [1]]);
  const byName = new Map(metadata);
  assert.deepEqual(stmt.values.slice(3), sorted.map((c) => [byName.get(c)]));

  // Outside double-quoted identifiers, the text is only keywords, aliases, placeholders and punctuation.
  const outside = stmt.text.replace(/"(?:[^"]|"")*"/g, "");
  assert.match(outside, /^[A-Za-z0-9_$:[\]., ()]*$/);
  assert.doesNotMatch(outside, /DROP|select|user|order|--|\/\*|;/);
  for (const [, v] of metadata) assert.ok(!stmt.text.includes(v), `value ${v} in SQL text`);
  assert.ok(!stmt.text.includes("'"), "a quote character from a value in the SQL text");
});

Deno.test("buildInsert: 100,000 rows from one message are one statement with one parameter per column", () => {
  const n = 100_000;
  const payload: Record<string, number | string> = {};
  for (let i = 0; i < n; i++) payload[`m${i}`] = i;
  const t0 = performance.now();
  const msg = parsed({
    app_id: "app",
    data: { time: 1700000000, device: "d", metadata: { site: "roof", floor: 3 }, payload },
  });
  const groups = groupsOf(translate(msg, appTable({ site: ["text", 128], floor: "number" })));
  assert.equal(groups.length, 1);
  const stmt = buildInsert(groups[0]!);
  const ms = performance.now() - t0;
  // 100,000 rows x 5 columns would be 500,000 scalar parameters (> 65,535); here it is 5 arrays.
  assert.equal(stmt.values.length, 5);
  assert.deepEqual(stmt.text.match(/\$\d+/g), ["$1", "$2", "$3", "$4", "$5"]);
  for (const v of stmt.values) assert.equal((v as unknown[]).length, n);
  assert.equal((stmt.values[1] as string[])[n - 1], `m${n - 1}`);
  assert.equal((stmt.values[2] as number[])[n - 1], n - 1);
  assert.equal((stmt.values[3] as number[])[n - 1], 3);
  assert.equal((stmt.values[4] as string[])[0], "roof");
  assert.ok(ms < 5000, `parse + translate + build took ${ms} ms`);
});
