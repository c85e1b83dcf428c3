/* The exported page: a form over charrnn.js (load, stream, stop).  window.charrnnPage holds the model and the
 * last generation's figures (the tests and benchmarks/web_speed.py read them). */
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const page = { model: null, ready: false, readyMs: null, lastRun: null, running: null };
  window.charrnnPage = page;
  const FLUSH_MS = 50;     // how often streamed text reaches the page
  const MAX_SAMPLES = 64;  // boxes the page shows at most (charrnn.js takes as many as memory allows)

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function number(id, parse) {       // an empty field is "not given"
    const text = $(id).value.trim();
    if (text === "") return null;
    const value = parse(text);
    if (Number.isNaN(value)) throw new Error(`${$(id).closest("label").textContent.trim()}: ${text} is not a number`);
    return value;
  }

  function unescape(text) {          // the stop field's \n, \t and \\ (a stop text cannot be typed otherwise)
    return text.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
  }

  function readOptions() {
    const stop = $("stop").value, samples = number("samples", Number) ?? 1;
    if (samples > MAX_SAMPLES) throw new Error(`Samples: at most ${MAX_SAMPLES} in this page, got ${samples}`);
    return {
      length: number("length", Number), temperature: number("temperature", Number),
      topK: number("top-k", Number), topP: number("top-p", Number), seed: number("seed", (t) => t),
      numSamples: samples, stop: stop ? [unescape(stop)] : [], label: $("label").value || null,
    };
  }

  function describe(info) {
    const bpc = info.bitsPerChar && info.bitsPerChar[info.weights];
    return `${info.arch.toUpperCase()} ${info.layers} × ${info.hidden}, ${info.vocabulary} vocabulary of ` +
      `${info.vocabSize}, ${info.weights} weights` + (bpc ? `, ${bpc.toFixed(3)} bits/char on validation` : "") +
      `. Runs in this page (charrnn ${info.charrnn}, onnxruntime-web); nothing is sent anywhere.`;
  }

  function showLabels(labels) {      // a labelled model's labels to choose from (the first: unlabelled)
    if (!labels.length) return;
    for (const [k, name] of labels.entries()) {
      const option = document.createElement("option");
      option.value = k ? name : "";
      option.textContent = name;
      $("label").append(option);
    }
    $("label-field").hidden = false;
  }

  function outputs(prompt, rows) {
    $("outputs").replaceChildren();
    return Array.from({ length: rows }, (_, r) => {
      const pre = document.createElement("pre");
      pre.className = "sample";
      pre.setAttribute("aria-label", `sample ${r + 1}`);
      const head = document.createElement("span");
      head.className = "prompt";
      head.textContent = prompt;
      const body = document.createTextNode("");
      pre.append(head, body);
      $("outputs").append(pre);
      return body;
    });
  }

  async function generate() {
    $("error").hidden = true;
    const prompt = $("prompt").value, controller = new AbortController();
    let options, unknown;
    try {                          // checked before anything is shown: a bad option fails this generation only
      options = page.model.options(readOptions());
      unknown = page.model.unknown(prompt);
    } catch (e) { showError(e.message); return; }
    options.signal = controller.signal;
    const run = { chars: 0, seconds: 0, firstPieceMs: null, finished: false, stopped: false, texts: [] };
    page.running = controller;
    $("generate").disabled = true;
    $("stop-button").disabled = false;
    $("status").textContent = (unknown.length ? "Not in the model's vocabulary, read as [UNK]: " +
      unknown.slice(0, 10).map((c) => JSON.stringify(c)).join(", ") + (unknown.length > 10 ? ", …" : "") + ". "
      : "") + "Generating…";
    const bodies = outputs(prompt, options.numSamples), pending = bodies.map(() => "");
    run.texts = bodies.map(() => "");
    const t0 = performance.now();
    let flushed = t0;
    const flush = () => {
      pending.forEach((text, r) => { if (text) bodies[r].appendData(text); pending[r] = ""; });
      run.seconds = (performance.now() - t0) / 1000;
      $("speed").textContent = `${Math.round(run.chars / Math.max(run.seconds, 1e-3))} characters/s`;
      flushed = performance.now();
    };
    try {
      for await (const pieces of page.model.stream(prompt, options)) {
        if (run.firstPieceMs === null) run.firstPieceMs = performance.now() - t0;
        pieces.forEach((p, r) => { pending[r] += p; run.texts[r] += p; run.chars += Array.from(p).length; });
        if (performance.now() - flushed > FLUSH_MS) flush();
      }
      run.stopped = controller.signal.aborted;
      flush();
      $("status").textContent = $("status").textContent.replace("Generating…", "") +
        `${run.stopped ? "Stopped" : "Done"}: ${run.chars} characters in ${run.seconds.toFixed(2)} s.`;
    } catch (e) {
      flush();
      showError(e.message);
      $("status").textContent = "";
    } finally {
      run.finished = true;
      page.lastRun = run;
      page.running = null;
      $("generate").disabled = false;
      $("stop-button").disabled = true;
    }
  }

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (page.ready && !page.running) generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("form").requestSubmit();
    }
  });
  $("stop-button").addEventListener("click", () => { if (page.running) page.running.abort(); });

  (async () => {
    try {
      if (!window.charrnn) throw new Error("charrnn.js did not load (missing or damaged): export the model again");
      page.model = await window.charrnn.load();
      $("about").textContent = describe(page.model.info);
      showLabels(page.model.info.labels);
      page.ready = true;
      page.readyMs = performance.now();
      $("generate").disabled = false;
    } catch (e) {
      $("about").textContent = "The model could not be loaded.";
      showError(e.message);
      page.error = e.message;
    }
  })();
})();
