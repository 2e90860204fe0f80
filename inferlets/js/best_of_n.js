/**
 * Best-of-n in JavaScript: inferlets/best_of_n.py written on the WIT imports.
 *
 *     pie run inferlets/js/best_of_n.js -- 4 "Give a one-line definition of entropy."
 *
 * The prompt runs once and n forks share its pages (`kv.fork`). The forks sample side by side,
 * each with its own seed, in loops the host runs (`forward.generate-many`: their steps share
 * batches). Each answer is then scored by its mean log-probability: the fork is truncated back
 * to the prompt and one forward re-reads the answer with a `logprobs` output at every position.
 * Seeded sampling draws the same tokens in any batch, so this prints what the Python one does.
 */
import { chatTemplate, decode, encode, open, stopTokens } from 'pie:inferlet/model@0.1.0';
import { close, create, fork, length, truncate } from 'pie:inferlet/kv@0.1.0';
import {
  execute, executeMany, generateMany, generateNext, outputs, takeGenerated,
} from 'pie:inferlet/forward@0.1.0';
import { discard } from 'pie:inferlet/poll@0.1.0';
import { entry, unwrap, waitAll } from './pie.js';

const MAX_TOKENS = 48;

function main(args) {
  const n = /^[0-9]+$/.test(args[0] ?? '') ? parseInt(args[0], 10) : 4;
  const prompt = args.slice(1).join(' ') || 'Give a one-line definition of entropy.';
  const model = open(undefined);
  const stops = [...stopTokens(model)].sort((a, b) => a - b);
  const chat = chatTemplate(model, [{ role: 'user', content: prompt }], true);
  const promptTokens = encode(model, chat);

  // The prompt but its last token goes into the KV once; the forks share those pages and each
  // samples from the last token.
  const ctx = create(model);
  discard(execute(ctx, forwardArgs(promptTokens.slice(0, -1), [])));
  const forks = Array.from({ length: n }, () => fork(ctx));
  const first = promptTokens[promptTokens.length - 1];
  const start = length(forks[0]);

  const runs = forks.map((f, seed) => [f, {
    tokens: [first],
    sampler: {
      tag: 'sample',
      val: { temperature: 0.9, topK: 0, topP: 1.0, minP: 0.0, seed: BigInt(seed) },
    },
    maxTokens: MAX_TOKENS,
    stopTokens: stops,
    stopStrings: [],
    streamToClient: false,
    chunkTokens: 0,
    text: false,
  }]);
  const generations = generateMany(runs).map(unwrap);
  const answers = waitAll(generations.map(generateNext)).map((f) => [...takeGenerated(f).tokens]);

  // Rewind each fork to the prompt and re-read its answer in one forward: the log-probability
  // of each answer token at the position before it.
  const rescore = forks.map((f, i) => {
    truncate(f, start);
    const inputs = [first, ...answers[i].slice(0, -1)];
    const wanted = answers[i].map((t, at) => ({
      index: at,
      sampler: { tag: 'logprobs', val: [t] },
    }));
    return [f, forwardArgs(inputs, wanted)];
  });
  const scores = waitAll(executeMany(rescore).map(unwrap)).map((future, i) => {
    const logprobs = outputs(future).map((out) => out.val[0]);
    close(forks[i]);
    return logprobs.reduce((sum, lp) => sum + lp, 0) / answers[i].length;
  });

  const texts = answers.map((tokens) => decode(model, tokens.filter((t) => !stops.includes(t))));
  let best = 0;
  scores.forEach((score, i) => { if (score > scores[best]) best = i; });
  return JSON.stringify({
    best,
    text: texts[best],
    scores: scores.map((s) => Number(s.toFixed(4))),
    texts,
  });
}

function forwardArgs(tokens, wanted) {
  const causal = { positions: undefined, attentionMask: undefined, logitMask: undefined };
  return { tokens, ...causal, outputs: wanted };
}

export const run = entry(main);
