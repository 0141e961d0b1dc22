const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

export function fromUtf8(bytes: Uint8Array): string {
  return decoder.decode(bytes);
}

/** Compact JSON bytes of `value` (undefined → null), like serde_json::to_vec. */
export function toJsonBytes(value: unknown): Uint8Array {
  return utf8(toJsonText(value));
}

export function toJsonText(value: unknown): string {
  const text = JSON.stringify(value === undefined ? null : value);
  return text === undefined ? "null" : text;
}

/** Compares two strings by the byte order of their UTF-8 encodings (the host's key order). */
export function compareBytes(a: string, b: string): number {
  if (a === b) return 0;
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) {
    const d = x[i]! - y[i]!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}
