// Runs one multi-turn scenario of the Vercel AI SDK (`ai` with `@ai-sdk/openai`'s Responses
// model) against the gateway, and prints what each turn got back as one JSON line on stdout.
//
//   RESPGW_BASE_URL=http://127.0.0.1:8080/v1 node vercel_ai.mjs <scenario>
//
// A turn that fails prints {"error": {status, message, body}} in place of its result, so that
// the test sees the gateway's refusal. Scenarios:
//   previous-response-id  three turns chained with providerOptions.openai.previousResponseId,
//                         the second one streamed
//   messages-stateless    two turns passing the whole message history with store: false,
//                         the second one streamed
//   messages-stored       two turns passing the whole message history with store left on: the
//                         SDK sends the earlier answer as an item_reference
//   conversation          two turns in the conversation RESPGW_CONVERSATION_ID
//                         (providerOptions.openai.conversation), the second one streamed
//   tools                 one generateText call whose model calls a tool the SDK runs, then
//                         answers (two requests)
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const baseURL = process.env.RESPGW_BASE_URL;
const conversationId = process.env.RESPGW_CONVERSATION_ID;
const openai = createOpenAI({ baseURL, apiKey: "test-key" });
const model = openai.responses("fake-model");

function failure(err) {
  return {
    error: {
      status: err.statusCode ?? null,
      message: String(err.message ?? err),
      body: err.responseBody ?? null,
    },
  };
}

async function generated(options) {
  try {
    const result = await generateText({ model, maxRetries: 0, ...options });
    return {
      text: result.text,
      responseId: result.providerMetadata?.openai?.responseId ?? null,
      messages: result.response.messages,
      steps: result.steps.length,
      toolResults: result.steps.flatMap((step) =>
        step.toolResults.map((r) => ({ toolName: r.toolName, output: r.output })),
      ),
    };
  } catch (err) {
    return failure(err);
  }
}

async function streamed(options) {
  let error = null;
  const result = streamText({
    model,
    maxRetries: 0,
    ...options,
    onError: ({ error: e }) => {
      error = e;
    },
  });
  let deltas = 0;
  for await (const part of result.fullStream) {
    if (part.type === "text-delta") deltas += 1;
  }
  if (error !== null) return failure(error);
  const metadata = await result.providerMetadata;
  return {
    text: await result.text,
    responseId: metadata?.openai?.responseId ?? null,
    messages: (await result.response).messages,
    deltas,
  };
}

const user = (text) => ({ role: "user", content: text });

const scenarios = {
  async "previous-response-id"() {
    const first = await generated({ prompt: "My name is Ada." });
    if (first.error) return [first];
    const second = await streamed({
      prompt: "What is my name?",
      providerOptions: { openai: { previousResponseId: first.responseId } },
    });
    if (second.error) return [first, second];
    const third = await generated({
      prompt: "Spell it.",
      providerOptions: { openai: { previousResponseId: second.responseId } },
    });
    return [first, second, third];
  },

  async "messages-stateless"() {
    const store = { openai: { store: false } };
    const history = [user("My name is Ada.")];
    const first = await generated({ messages: history, providerOptions: store });
    if (first.error) return [first];
    history.push(...first.messages, user("What is my name?"));
    const second = await streamed({ messages: history, providerOptions: store });
    return [first, second];
  },

  async "messages-stored"() {
    const history = [user("My name is Ada.")];
    const first = await generated({ messages: history });
    if (first.error) return [first];
    history.push(...first.messages, user("What is my name?"));
    const second = await streamed({ messages: history });
    return [first, second];
  },

  async conversation() {
    // The conversation holds the history: each turn sends only its new message.
    const options = { openai: { conversation: conversationId } };
    const first = await generated({ prompt: "My name is Ada.", providerOptions: options });
    if (first.error) return [first];
    const second = await streamed({ prompt: "What is my name?", providerOptions: options });
    return [first, second];
  },

  async tools() {
    const weather = tool({
      description: "The weather in a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => `sunny in ${city}`,
    });
    return [
      await generated({
        prompt: "What is the weather in Paris?",
        tools: { weather },
        stopWhen: stepCountIs(3),
      }),
    ];
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`unknown scenario '${name}'; one of: ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
const turns = await scenarios[name]();
for (const turn of turns) delete turn.messages;
process.stdout.write(`${JSON.stringify(turns)}\n`);
