/**
 * What every JavaScript inferlet shares: the `run` export around a `main(args)`, and waiting
 * on host futures. The rest is the WIT imports themselves (`pie:inferlet/...@0.1.0`), which
 * componentize-js binds as plain functions: a `result` error is thrown as a `ComponentError`
 * whose `payload` is the host's message.
 */
import { waitAny } from 'pie:inferlet/poll@0.1.0';

/**
 * The world's `run` export for `main(args)`: the arguments parsed from the input's JSON array
 * (as the Python SDK does), the result as text, an exception as the `err` text (its stack,
 * then its message as the last line: what `pie run` prints).
 */
export function entry(main) {
  return function run(input) {
    let args;
    try {
      args = input ? JSON.parse(input) : [];
    } catch {
      args = [input];
    }
    try {
      const result = main(args);
      return result === undefined || result === null ? '' : String(result);
    } catch (error) {
      // Only a string can cross as the `err` of `run`: anything else would trap.
      throw describe(error);
    }
  };
}

function describe(error) {
  if (!(error instanceof Error)) return String(error);
  const message = error.payload !== undefined ? String(error.payload) : error.message;
  return `${error.stack || ''}${error.name}: ${message}`;
}

/** Blocks until `future` is ready; returns it, for the getter of its kind. */
export function waitFor(future) {
  waitAny([future], undefined);
  return future;
}

/** Blocks until every one of `futures` is ready (one `wait-any` per wake-up). */
export function waitAll(futures) {
  let pending = [...futures];
  while (pending.length > 0) {
    const ready = new Set(waitAny(pending, undefined));
    pending = pending.filter((_, i) => !ready.has(i));
  }
  return futures;
}

/** The value of one `result` of a batched call (`execute-many`, `generate-many`). */
export function unwrap(result) {
  if (result.tag === 'err') throw new Error(result.val);
  return result.val;
}
