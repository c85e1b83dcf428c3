// The page: POST the form to /v1/generate/stream, append the streamed characters, Stop aborts the request
// (the server notices the closed connection and stops generating).  A server started with an API key
// answers /v1/ requests 401 without it: the page then asks for the key and keeps it for this tab.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form"), generateButton = $("generate"), stopButton = $("stop"), statusLine = $("status");
const temperature = $("temperature"), temperatureValue = $("temperature-value");
const outputPrompt = $("output-prompt"), outputText = $("output-text");
let controller = null;
const KEY = "charrnn-api-key";

// The headers of a /v1/ request: these, and the key when one was given.
function withKey(headers = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

function askForKey(message) {
  sessionStorage.removeItem(KEY);
  $("key-form").hidden = false;
  $("api-key").focus();
  setStatus(message, true);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  setStatus("");
  showModel();
});

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function setRunning(running) {
  generateButton.disabled = running;
  stopButton.disabled = !running;
  document.body.dataset.state = running ? "running" : "idle";
}

temperature.addEventListener("input", () => {
  temperatureValue.textContent = Number(temperature.value).toFixed(2);
});

async function showModel() {
  try {
    const response = await fetch("/v1/model", { headers: withKey() });
    if (response.status === 401) {
      $("model-info").textContent = "this server needs an API key";
      askForKey((await response.json()).error);
      return;
    }
    const info = await response.json();
    const m = info.model;
    $("model-info").textContent = info.kind === "huggingface"
      ? `${m} (Hugging Face ${info.model_type}): ${info.parameters.toLocaleString()} parameters, ` +
        `${info.vocabulary.toLocaleString()} tokens, context ${info.context} tokens`
      : `${info.run} (${info.weights}): ${m.arch.toUpperCase()} ${m.layers} x ${m.hidden}, ` +
        `${info.parameters.toLocaleString()} parameters, ${m.vocab_size} symbols` +
        (info.corpus && info.corpus.name ? `, trained on ${info.corpus.name}` : "") + (info.int8 ? ", int8" : "");
    $("length").max = info.limits.max_length;
    $("prompt").maxLength = info.limits.max_prompt_chars;
  } catch (e) {
    $("model-info").textContent = "could not describe the model: " + e;
  }
}

function request() {
  const body = {
    prompt: $("prompt").value,
    length: Number($("length").value),
    temperature: Number(temperature.value),
  };
  const optional = { top_k: $("top-k").value, top_p: $("top-p").value, seed: $("seed").value };
  for (const [key, value] of Object.entries(optional)) {
    if (value !== "") body[key] = Number(value);
  }
  return body;
}

// Server-sent events over fetch: EventSource cannot POST a JSON body, so the stream is parsed here.
// Each event is "event: NAME\ndata: JSON\n\n"; events without a name carry {"text": [new characters]}.
function handleEvent(raw) {
  let event = "message", data = "";
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  const payload = JSON.parse(data);
  if (event === "message") {
    const output = $("output");
    const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    outputText.textContent += payload.text[0];
    if (atBottom) output.scrollTop = output.scrollHeight;  // follow the text unless the reader scrolled up
    setStatus(`${outputText.textContent.length} characters`);
  } else if (event === "done") {
    setStatus(`done: ${outputText.textContent.length} characters (seed ${payload.seed})`);
  } else if (event === "error") {
    setStatus(payload.error, true);
  }
}

async function generate() {
  controller = new AbortController();
  setRunning(true);
  const body = request();
  outputPrompt.textContent = body.prompt;
  outputText.textContent = "";
  setStatus("generating…");
  try {
    const response = await fetch("/v1/generate/stream", {
      method: "POST",
      headers: withKey({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ error: response.statusText }));
      if (response.status === 401) askForKey(problem.error);
      else setStatus(`error ${response.status}: ${problem.error}`, true);
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") setStatus(`stopped after ${outputText.textContent.length} characters`);
    else setStatus(String(e), true);
  } finally {
    controller = null;
    setRunning(false);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!controller) generate();
});
stopButton.addEventListener("click", () => {
  if (controller) controller.abort();
});

setRunning(false);
showModel();
