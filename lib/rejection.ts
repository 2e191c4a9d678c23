/**
 * Why a message cannot be stored. `reason` is the exact string written to
 * `"errorTable"` (SPEC section 4); it is what the platform shows its users.
 */
export interface Rejection {
  readonly reason: string;
  /** The message's app id as sent ("" when it could not be read). */
  readonly appId: string;
  /** The reading's device as sent ("" when absent). */
  readonly device: string;
}

/** The error strings the old platform shows its users; keep them byte for byte. */
export const Reasons = {
  invalidApp: "invalid app",
  invalidMetadata: "invalid metadata",
  stringForNumber: "unexpected string (expected number)",
  booleanForNumber: "unexpected boolean (expected number)",
  objectForPrimitive: "unexpected object (expected primitive)",
  emptyPayload: "assertion failure: received empty payload (no metrics)",
} as const;

/** Builds a rejection. */
export function reject(reason: string, appId = "", device = ""): Rejection {
  return { reason, appId, device };
}
