/**
 * lib/ident.ts: identifier validation (never truncate) and quoting (always
 * double-quoted, `"` doubled, schema-qualified).
 */
import assert from "node:assert/strict";
import { identifierProblem, MAX_IDENTIFIER_BYTES, qualified, quoteIdent } from "../lib/ident.ts";

const bytes = (s: string) => new TextEncoder().encode(s).length;

Deno.test("MAX_IDENTIFIER_BYTES is PostgreSQL's NAMEDATALEN - 1", () => {
  assert.equal(MAX_IDENTIFIER_BYTES, 63);
});

const problems: Array<[string, string, string | null]> = [
  ["empty", "", "is empty"],
  ["NUL", "a\0b", "contains a NUL character"],
  ["lone high surrogate", "a\ud800", "is not valid Unicode"],
  ["lone low surrogate", "\udfffa", "is not valid Unicode"],
  ["63 ASCII bytes", "a".repeat(63), null],
  ["64 ASCII bytes", "a".repeat(64), "is 64 bytes long (PostgreSQL allows 63)"],
  ["1000 ASCII bytes", "x".repeat(1000), "is 1000 bytes long (PostgreSQL allows 63)"],
  ["21 x é = 42 bytes", "é".repeat(21), null],
  ["31 x é + a = 63 bytes", "é".repeat(31) + "a", null],
  ["32 x é = 64 bytes", "é".repeat(32), "is 64 bytes long (PostgreSQL allows 63)"],
  // 32 UTF-16 units but 64 bytes: the ASCII fast path must not be fooled by .length.
  ["15 emoji = 60 bytes", "😀".repeat(15), null],
  ["16 emoji = 64 bytes", "😀".repeat(16), "is 64 bytes long (PostgreSQL allows 63)"],
  ["emoji + 59 ASCII = 63 bytes", "😀" + "a".repeat(59), null],
  ["emoji + 60 ASCII = 64 bytes", "😀" + "a".repeat(60), "is 64 bytes long (PostgreSQL allows 63)"],
  ["control characters are legal when quoted", "a\nb\tc", null],
  ["double quote", 'a"b', null],
  ["SQL", "DROP TABLE x;", null],
  ["comment", "x -- y /* z */", null],
  ["reserved word", "select", null],
  ["mixed case", "MixedCase", null],
];

for (const [name, input, expected] of problems) {
  Deno.test(`identifierProblem: ${name}`, () => {
    assert.equal(identifierProblem(input), expected);
    if (expected === null) assert.ok(bytes(input) <= 63);
  });
}

const quoted: Array<[string, string]> = [
  ["plain", '"plain"'],
  ["MixedCase", '"MixedCase"'],
  ["select", '"select"'],
  ["user", '"user"'],
  ['a"b', '"a""b"'],
  ['"', '""""'],
  ['x"; DROP TABLE t; --', '"x""; DROP TABLE t; --"'],
  ["/* c */", '"/* c */"'],
  ["é😀", '"é😀"'],
];

for (const [input, expected] of quoted) {
  Deno.test(`quoteIdent(${JSON.stringify(input)})`, () => {
    assert.equal(quoteIdent(input), expected);
  });
}

Deno.test("qualified always names the schema, quoting both parts", () => {
  assert.equal(qualified("public", "alice_weather"), '"public"."alice_weather"');
  assert.equal(qualified('s"x', 'T"; DROP TABLE t; --'), '"s""x"."T""; DROP TABLE t; --"');
  assert.equal(qualified("a.b", "c"), '"a.b"."c"');
});
