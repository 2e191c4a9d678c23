/**
 * lib/writer.ts arrayLiteral(): the writer sends each column of a batch as
 * one PostgreSQL array literal. Every value must come back exactly as it
 * was, whatever text it holds (quotes, backslashes, braces, NULL, blanks).
 */

import assert from "node:assert/strict";
import postgres from "postgres";
import { arrayLiteral } from "../lib/writer.ts";

const npmSockets = { sanitizeResources: false, sanitizeOps: false } as const;

Deno.test("arrayLiteral() quotes every string and escapes only backslash and quote", () => {
  assert.equal(arrayLiteral([]), "{}");
  assert.equal(
    arrayLiteral(["a", "", null, 'say "hi"', "c:\\dir"]),
    '{"a","",NULL,"say \\"hi\\"","c:\\\\dir"}',
  );
  assert.equal(arrayLiteral([1.5, -0, 1e21, null, 5e-324]), "{1.5,0,1e+21,NULL,5e-324}");
  assert.equal(arrayLiteral([true, false, null]), "{t,f,NULL}");
  // The one-join fast paths: only plain strings, only numbers.
  assert.equal(arrayLiteral(["a", "", "NULL", "{x,y}"]), '{"a","","NULL","{x,y}"}');
  assert.equal(arrayLiteral([1, 2.5, -3, 0]), "{1,2.5,-3,0}");
});

Deno.test({
  name: "arrayLiteral() round-trips hostile text, numbers and booleans through PostgreSQL",
  ...npmSockets,
  fn: async () => {
    const sql = postgres({
      host: "127.0.0.1",
      port: 5432,
      user: "postgres",
      database: "postgres",
      max: 1,
      onnotice: () => {},
    });
    try {
      const texts = [
        "plain",
        "",
        " leading and trailing ",
        "NULL",
        "null",
        '"',
        "\\",
        '\\"',
        '"\\',
        "{",
        "}",
        "{a,b}",
        "a,b",
        "'; DROP TABLE x; --",
        "tab\tnew\nline\r",
        "ünïcödé ✓ 𝄞",
        "\\N",
        "$1",
        "2026-12-03T19:34:06.767000Z",
      ];
      const cells = [...texts, null];
      const rows = await sql.unsafe<{ v: string | null }[]>(
        "SELECT v FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(cells) as never, 0)] as never[],
      );
      assert.deepEqual(rows.map((r) => r.v), cells);

      // Without null and quote/backslash the literal is built by one join: same result.
      const plain = texts.filter((t) => !/["\\]/.test(t));
      const p = await sql.unsafe<{ v: string }[]>(
        "SELECT v FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(plain) as never, 0)] as never[],
      );
      assert.deepEqual(p.map((r) => r.v), plain);
      const whole = [3, 1e21, 0.1, -2.25, 5e-324];
      const w = await sql.unsafe<{ v: number }[]>(
        "SELECT v FROM unnest($1::float8[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(whole) as never, 0)] as never[],
      );
      assert.deepEqual(w.map((r) => r.v), whole);

      const numbers = [
        0,
        -0,
        1.5,
        -2.25,
        0.1,
        1 / 3,
        1e21,
        1e-7,
        5e-324,
        1.7976931348623157e308,
        40,
        null,
      ];
      const back = await sql.unsafe<{ v: number | null }[]>(
        "SELECT v FROM unnest($1::float8[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(numbers) as never, 0)] as never[],
      );
      // -0 arrives as 0 (String(-0) is "0", as with postgres.js's own serializer; equal in SQL).
      assert.deepEqual(back.map((r) => r.v), numbers.map((n) => (Object.is(n, -0) ? 0 : n)));

      const bools = [true, false, null];
      const b = await sql.unsafe<{ v: boolean | null }[]>(
        "SELECT v FROM unnest($1::bool[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(bools) as never, 0)] as never[],
      );
      assert.deepEqual(b.map((r) => r.v), bools);

      // Timestamps travel as text and are cast by the statement.
      const times = ["2026-12-03T19:34:06.767123Z", "0001-01-01T00:00:00.000000Z"];
      const t = await sql.unsafe<{ v: string }[]>(
        "SELECT to_char(v::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS v " +
          "FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
        [sql.typed(arrayLiteral(times) as never, 0)] as never[],
      );
      assert.deepEqual(t.map((r) => r.v), times);
    } finally {
      await sql.end();
    }
  },
});
