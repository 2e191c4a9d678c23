/**
 * SQL identifiers: validation and quoting. PostgreSQL silently truncates
 * names longer than 63 bytes, which would send data to another table or
 * column, so such names are rejected instead.
 */

/** Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1). */
export const MAX_IDENTIFIER_BYTES = 63;

const encoder = new TextEncoder();

/** Returns why `name` cannot be used as an identifier, or null when it can. */
export function identifierProblem(name: string): string | null {
  if (name.length === 0) return "is empty";
  if (name.includes("\0")) return "contains a NUL character";
  if (!name.isWellFormed()) return "is not valid Unicode";
  // Fast path: an ASCII name of at most 63 characters is at most 63 bytes.
  if (name.length <= MAX_IDENTIFIER_BYTES && /^[ -~]*$/.test(name)) return null;
  const bytes = encoder.encode(name).length;
  if (bytes > MAX_IDENTIFIER_BYTES) {
    return `is ${bytes} bytes long (PostgreSQL allows ${MAX_IDENTIFIER_BYTES})`;
  }
  return null;
}

/** Double-quotes an identifier, doubling embedded quotes. Only for validated names. */
export function quoteIdent(name: string): string {
  return '"' + name.replaceAll('"', '""') + '"';
}

/** `"schema"."table"`: always schema-qualified so `search_path` cannot redirect it. */
export function qualified(schema: string, table: string): string {
  return quoteIdent(schema) + "." + quoteIdent(table);
}
