/**
 * Chat completion in JavaScript: inferlets/text_completion.py written on the WIT imports.
 *
 *     pie run inferlets/js/text_completion.js -- "Why is the sky blue?"
 *
 * The prompt is rendered by the model's chat template and tokenized on the host; the decode
 * loop is delegated to the host (`forward.generate`), which streams the text to the client as
 * it comes and hands back the whole text at the end: the same calls the Python SDK makes for
 * `ctx.generate(max_tokens=256, stream=send)`, so the two print the same text.
 */
import { chatTemplate, encode, info, open, stopTokens } from 'pie:inferlet/model@0.1.0';
import { create } from 'pie:inferlet/kv@0.1.0';
import { generate, generateNext, takeGenerated } from 'pie:inferlet/forward@0.1.0';
import { entry, waitFor } from './pie.js';

const MAX_TOKENS = 256;

function main(args) {
  const prompt = args.join(' ') || 'Tell me a short story about a robot.';
  const model = open(undefined);
  const messages = [
    { role: 'system', content: 'You are a helpful assistant.' },
    { role: 'user', content: prompt },
  ];
  const tokens = encode(model, chatTemplate(model, messages, true));
  const context = info(model).maxPosition;
  if (tokens.length > context) {
    const size = `the prompt is ${tokens.length} tokens, the model's context is ${context}`;
    throw new Error(`${size}: shorten it`);
  }
  const generation = generate(create(model), {
    tokens,
    sampler: { tag: 'greedy' },
    maxTokens: MAX_TOKENS,
    stopTokens: [...stopTokens(model)].sort((a, b) => a - b),
    stopStrings: [],
    streamToClient: true, // the host sends the text to the client as it is produced
    chunkTokens: 0, // wake this program only at the end
    text: true,
  });
  let text = '';
  for (;;) {
    const chunk = takeGenerated(waitFor(generateNext(generation)));
    text += chunk.text;
    if (chunk.finish !== undefined && chunk.finish !== null) return text;
  }
}

export const run = entry(main);
