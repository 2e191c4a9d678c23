/**
 * Micro benchmarks of the per-message path and the writer's CPU work:
 * `deno task bench:micro` (or `deno bench -P bench/micro_bench.ts`).
 * Pure CPU and local disk; needs no server.
 */

import { DatabaseSync } from "node:sqlite";
import { parseMessage } from "../lib/ir.ts";
import { Spool } from "../lib/spool.ts";
import {
  buildInsert,
  type ColumnInfo,
  mergeInto,
  type RowGroup,
  type TableInfo,
  translate,
} from "../lib/translate.ts";
import { messageBytes } from "./workload.ts";

const table: TableInfo = {
  schema: "public",
  table: "bench_app",
  columns: new Map<string, ColumnInfo>([
    ["time", { kind: "timestamp", maxChars: null }],
    ["metric", { kind: "text", maxChars: 128 }],
    ["value", { kind: "number", maxChars: null }],
    ["site", { kind: "text", maxChars: 128 }],
    ["seq", { kind: "number", maxChars: null }],
    ["status", { kind: "text", maxChars: 128 }],
    ["committed", { kind: "timestamp", maxChars: null }],
  ]),
};
const now = Date.now();
const messages = Array.from({ length: 1000 }, (_, i) => messageBytes("bench_app", i, now + i));
let next = 0;
const message = () => messages[next++ % messages.length]!;

Deno.bench("parseMessage (one ~285-byte message)", { group: "message" }, () => {
  const r = parseMessage(message());
  if (!r.ok) throw new Error(r.rejection.reason);
});

Deno.bench("parseMessage + translate (one message, 5 rows)", { group: "message" }, () => {
  const r = parseMessage(message());
  if (!r.ok) throw new Error(r.rejection.reason);
  const t = translate(r.message, table);
  if (!t.ok) throw new Error(t.rejection.reason);
});

Deno.bench("JSON.parse alone (one message, for comparison)", { group: "message" }, () => {
  JSON.parse(new TextDecoder().decode(message()));
});

// ---------------------------------------------------------------------------
// Spool

const dir = Deno.makeTempDirSync({ prefix: "sif-bench-spool-" });
const spool = Spool.open(`${dir}/normal`, { sync: "normal" });
const spoolFull = Spool.open(`${dir}/full`, { sync: "full" });
const topic = "ingest/stream/0";

Deno.bench("Spool.append (synchronous NORMAL, one transaction per message)", {
  group: "spool",
  baseline: true,
}, () => {
  spool.append(topic, message(), Date.now());
});

Deno.bench(
  "Spool.append (synchronous FULL: fsync per message)",
  { group: "spool", n: 2000 },
  () => {
    spoolFull.append(topic, message(), Date.now());
  },
);

// Group commit as the service does it: one transaction per socket read (n counts groups of 100).
const grouped = Spool.open(`${dir}/grouped`, { sync: "normal" });
Deno.bench("Spool.stage x100 + commit (group commit, per 100 messages)", {
  group: "spool",
}, () => {
  for (let i = 0; i < 100; i++) grouped.stage(topic, message(), Date.now());
  grouped.commit();
});

// The same insert into a bare SQLite file, 100 per transaction, without the Spool's bookkeeping.
const raw = new DatabaseSync(`${dir}/grouped.sqlite`);
raw.exec(`PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
  CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at INTEGER NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL);`);
const rawInsert = raw.prepare(
  "INSERT INTO messages (received_at, topic, payload) VALUES (?, ?, ?)",
);
Deno.bench("SQLite insert, 100 per transaction (per 100 messages)", { group: "spool" }, () => {
  raw.exec("BEGIN");
  for (let i = 0; i < 100; i++) rawInsert.run(Date.now(), topic, message());
  raw.exec("COMMIT");
});

Deno.bench("Spool.read 2000 + deleteThrough (writer side, per 2000 messages)", {
  group: "spool-drain",
}, (b) => {
  for (let i = 0; i < 2000; i++) spool.append(topic, message(), Date.now());
  b.start();
  const entries = spool.read(0, 2000);
  spool.deleteThrough(entries[entries.length - 1]!.seq);
  b.end();
});

// ---------------------------------------------------------------------------
// Grouping and statements

function groupsOf(count: number): RowGroup[] {
  const merged = new Map<string, RowGroup>();
  for (let i = 0; i < count; i++) {
    const r = parseMessage(message());
    if (!r.ok) throw new Error(r.rejection.reason);
    const t = translate(r.message, table);
    if (!t.ok) throw new Error(t.rejection.reason);
    for (const g of t.groups) {
      const into = merged.get(g.key);
      if (into) mergeInto(into, g);
      else merged.set(g.key, g);
    }
  }
  return [...merged.values()];
}

Deno.bench("parse + translate + merge 1000 messages (5000 rows)", { group: "batch" }, () => {
  groupsOf(1000);
});

const groups = groupsOf(1000);
Deno.bench("buildInsert (groups of 1000 messages, 5000 rows)", { group: "batch" }, () => {
  for (const g of groups) buildInsert(g);
});

globalThis.addEventListener("unload", () => {
  spool.close();
  spoolFull.close();
  grouped.close();
  raw.close();
  Deno.removeSync(dir, { recursive: true });
});
