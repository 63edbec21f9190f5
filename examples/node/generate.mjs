#!/usr/bin/env node
// Calls llm-mesh's public Router from Node, with a client built at runtime from the .proto files
// (no generated code, no build step): proof that any gRPC language can use the mesh.
//
//   node examples/node/generate.mjs --target 127.0.0.1:50051 "Tell me about meshes"
//   node examples/node/generate.mjs --stream --max-tokens 64 --temperature 0 "Tell me about meshes"
//
// The answer goes to stdout (as it arrives with --stream) and a one-line summary to stderr.
// --json prints one JSON object instead: {text, summary, request_id, chunks}, where chunks is every
// GenerateStreamResponse received, as decoded (empty for a unary call). On a gRPC error it prints
// `error: <CODE>: <details>` to stderr and exits 1.

import path from "node:path";
import process from "node:process";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

// @grpc/* are CommonJS packages installed at the repository root (npm ci).
const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "..", "..", "protos");
const DEFAULT_MODEL = "sim-llama-3.1-8b";

const USAGE = `usage: node examples/node/generate.mjs [options] PROMPT

options:
  --target HOST:PORT     the router (default 127.0.0.1:50051, env LLMMESH_TARGET)
  --stream               call GenerateStream and print text as it arrives
  --model M              model name (default ${DEFAULT_MODEL})
  --max-tokens N         sampling.max_tokens (default: the server's)
  --temperature T        sampling.temperature; 0 is deterministic (default: the server's, 1.0)
  --seed S               sampling.seed (makes a request deterministic)
  --request-id ID        your id for the request (default: the router assigns one)
  --timeout SECONDS      deadline for the call (default 60)
  --json                 print {text, summary, request_id, chunks} as one JSON object
  -h, --help             show this help`;

function fail(message, code = 2) {
  process.stderr.write(`${message}\n`);
  process.exit(code);
}

function parseCli(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        target: { type: "string", default: process.env.LLMMESH_TARGET ?? "127.0.0.1:50051" },
        stream: { type: "boolean", default: false },
        model: { type: "string", default: DEFAULT_MODEL },
        "max-tokens": { type: "string" },
        temperature: { type: "string" },
        seed: { type: "string" },
        "request-id": { type: "string", default: "" },
        timeout: { type: "string", default: "60" },
        json: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (err) {
    fail(`${err.message}\n\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (positionals.length !== 1) {
    fail(`expected exactly one PROMPT argument (got ${positionals.length})\n\n${USAGE}`);
  }
  const number = (flag, isInteger) => {
    const raw = values[flag];
    if (raw === undefined) return undefined;
    const value = Number(raw);
    if (raw.trim() === "" || Number.isNaN(value) || (isInteger && !Number.isInteger(value))) {
      fail(`--${flag}: not ${isInteger ? "an integer" : "a number"}: ${raw}`);
    }
    return value;
  };
  const timeout = number("timeout", false);
  if (!(timeout > 0)) fail(`--timeout: must be > 0 (got ${values.timeout})`);
  if (values.seed !== undefined && !/^\d+$/.test(values.seed)) {
    fail(`--seed: not a non-negative integer: ${values.seed}`);
  }
  return {
    target: values.target,
    stream: values.stream,
    json: values.json,
    timeoutSeconds: timeout,
    prompt: positionals[0],
    model: values.model,
    requestId: values["request-id"],
    maxTokens: number("max-tokens", true),
    temperature: number("temperature", false),
    seed: values.seed,
  };
}

function loadRouterClient(target) {
  // The file is named relative to the include directory, as its own imports are.
  const definition = protoLoader.loadSync("llmmesh/v1/router.proto", {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const { Router } = grpc.loadPackageDefinition(definition).llmmesh.v1;
  return new Router(target, grpc.credentials.createInsecure());
}

function buildRequest(cli) {
  // Only the sampling fields given are set, so the others keep the server's defaults (they are
  // proto3 `optional`: presence is what the server reads, and 0 is a real value).
  const sampling = {};
  if (cli.maxTokens !== undefined) sampling.max_tokens = cli.maxTokens;
  if (cli.temperature !== undefined) sampling.temperature = cli.temperature;
  if (cli.seed !== undefined) sampling.seed = cli.seed;
  return { model: cli.model, prompt: cli.prompt, sampling, request_id: cli.requestId };
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

function reportError(err) {
  const name = STATUS_NAMES[err.code] ?? String(err.code);
  process.stderr.write(`error: ${name}: ${err.details ?? err.message}\n`);
  process.exitCode = 1;
}

function summaryLine(requestId, summary) {
  if (!summary) return `request ${requestId}: no summary`;
  const t = summary.timings ?? {};
  const u = summary.usage ?? {};
  const ms = (x) => `${Number(x ?? 0).toFixed(1)} ms`;
  return [
    summary.cached ? "cached" : "not cached",
    `worker ${summary.worker_id || "-"}`,
    `finish ${String(summary.finish_reason).replace(/^FINISH_REASON_/, "").toLowerCase()}`,
    `tokens ${u.prompt_tokens ?? 0}+${u.completion_tokens ?? 0}`,
    `ttft ${ms(t.time_to_first_token_ms)}`,
    `total ${ms(t.total_ms)}`,
    `request ${requestId}`,
  ].join(" | ");
}

function finish(cli, result) {
  if (cli.json) {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } else {
    if (!cli.stream) process.stdout.write(result.text);
    process.stdout.write("\n");
    process.stderr.write(`${summaryLine(result.request_id, result.summary)}\n`);
  }
}

function generate(client, cli, request, deadline) {
  client.Generate(request, { deadline }, (err, response) => {
    client.close();
    if (err) return reportError(err);
    finish(cli, {
      text: response.text,
      summary: response.summary,
      request_id: response.request_id,
      chunks: [],
    });
  });
}

function generateStream(client, cli, request, deadline) {
  const chunks = [];
  let summary = null;
  let requestId = "";
  let failed = false;
  const call = client.GenerateStream(request, { deadline });
  call.on("data", (chunk) => {
    chunks.push(chunk);
    requestId = chunk.request_id || requestId;
    if (chunk.summary) summary = chunk.summary;
    if (!cli.json) process.stdout.write(chunk.text);
  });
  // grpc-js emits "error" for a non-OK status before the stream's "end"; "end" still follows.
  call.on("error", (err) => {
    failed = true;
    client.close();
    if (!cli.json && chunks.length > 0) process.stdout.write("\n");
    reportError(err);
  });
  call.on("end", () => {
    if (failed) return;
    client.close();
    const text = chunks.map((c) => c.text).join("");
    finish(cli, { text, summary, request_id: requestId, chunks });
  });
}

function main() {
  const cli = parseCli(process.argv.slice(2));
  const client = loadRouterClient(cli.target);
  const request = buildRequest(cli);
  const deadline = new Date(Date.now() + cli.timeoutSeconds * 1000);
  if (cli.stream) generateStream(client, cli, request, deadline);
  else generate(client, cli, request, deadline);
}

main();
