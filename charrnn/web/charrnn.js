/* charrnn.js: generate text from a model exported by `charrnn export RUN --format web`, in a web page, with
 * no server and no Python.  A classic script (it also works from file://, where browsers load no ES modules):
 *
 *   <script src="vendor/charrnn-vendor.js"></script>   onnxruntime-web and tokenizers.js
 *   <script src="vendor/ort-wasm.js"></script>         onnxruntime's WebAssembly binary
 *   <script src="model.js"></script>                   the model
 *   <script src="charrnn.js"></script>
 *   <script>
 *     (async () => {
 *       const lm = await charrnn.load();
 *       for await (const [piece] of lm.stream("ROMEO:", { length: 200, temperature: 0.8, seed: 1 }))
 *         document.body.append(piece);
 *     })();
 *   </script>
 *
 * The sampling is charrnn.runtime's (Python), step for step: the same one-step ONNX graph, the same filtering
 * (temperature, top-k, top-p, min-p; [UNK] never produced), the same random generator (xoshiro128**, as
 * charrnn/portable_random.py), the same token healing and stop texts; so a seed gives the text
 * `charrnn generate FILE.onnx --seed N` gives.
 */
(function (root) {
  "use strict";

  const FORMAT_VERSION = 1;   // of model.js: charrnn/web_export.py's FORMAT_VERSION
  const UNK_ID = 0;
  const GREEDY_BELOW = 1e-6;  // charrnn.options.GREEDY_BELOW: a temperature below it is greedy
  const YIELD_MS = 30;        // the longest a stream runs before letting the page draw and take clicks
  const BATCH_BYTES = 256 * 2 ** 20;   // the most memory one step's logits and state may take

  class CharrnnError extends Error {
    constructor(message) { super(message); this.name = "CharrnnError"; }
  }

  // -- the portable random generator (charrnn/portable_random.py) ----------------------------------
  const M64 = (1n << 64n) - 1n;
  const rotl = (x, k) => ((x << k) | (x >>> (32 - k))) >>> 0;

  class PortableRandom {
    constructor(seed) {
      let x = BigInt.asUintN(64, BigInt(seed));
      const words = [];
      for (let i = 0; i < 4; i++) {
        x = (x + 0x9E3779B97F4A7C15n) & M64;
        let z = ((x ^ (x >> 30n)) * 0xBF58476D1CE4E5B9n) & M64;
        z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & M64;
        words.push(Number((z ^ (z >> 31n)) & 0xFFFFFFFFn));
      }
      this.s = words.some((w) => w !== 0) ? words : [1, 0, 0, 0];
    }
    nextU32() {
      let [s0, s1, s2, s3] = this.s;
      const result = Math.imul(rotl(Math.imul(s1, 5) >>> 0, 7), 9) >>> 0;
      const t = (s1 << 9) >>> 0;
      s2 = (s2 ^ s0) >>> 0; s3 = (s3 ^ s1) >>> 0; s1 = (s1 ^ s2) >>> 0; s0 = (s0 ^ s3) >>> 0;
      s2 = (s2 ^ t) >>> 0;
      this.s = [s0, s1, s2, rotl(s3, 11)];
      return result;
    }
    uniform() {
      const a = this.nextU32() >>> 5, b = this.nextU32() >>> 6;
      return (a * 67108864 + b) / 9007199254740992;
    }
  }

  function randomSeed() {
    const words = new Uint32Array(2);
    root.crypto.getRandomValues(words);
    return (BigInt(words[0]) << 32n) | BigInt(words[1]);
  }

  // -- sampling: charrnn.runtime.process_logits and choose, one row at a time ----------------------
  function softmax(x) {
    let max = -Infinity;
    for (const v of x) if (v > max) max = v;
    const z = new Float64Array(x.length);
    let sum = 0;
    for (let i = 0; i < x.length; i++) { z[i] = Math.exp(x[i] - max); sum += z[i]; }
    for (let i = 0; i < z.length; i++) z[i] /= sum;
    return z;
  }

  function processLogits(row, o) {
    const x = Float64Array.from(row, (v) => v / o.temperature);
    x[UNK_ID] = -Infinity;
    if (o.topK != null && o.topK < x.length) {
      const kth = Float64Array.from(x).sort()[x.length - o.topK];
      for (let i = 0; i < x.length; i++) if (x[i] < kth) x[i] = -Infinity;
    }
    if (o.topP != null && o.topP < 1) {
      const order = Array.from(x.keys()).sort((a, b) => (x[b] - x[a]) || (a - b));
      const probs = softmax(order.map((i) => x[i]));
      let mass = 0;
      for (let j = 0; j < order.length; j++) {
        mass += probs[j];
        if (mass - probs[j] >= o.topP) x[order[j]] = -Infinity;
      }
    }
    if (o.minP) {
      const probs = softmax(x);
      const floor = o.minP * probs.reduce((a, b) => Math.max(a, b), 0);
      for (let i = 0; i < x.length; i++) if (probs[i] < floor) x[i] = -Infinity;
    }
    return x;
  }

  function chooseRow(row, o, rng) {
    if (o.temperature < GREEDY_BELOW) {
      let best = -1, bestValue = -Infinity;
      for (let i = 0; i < row.length; i++) {
        if (i !== UNK_ID && (best < 0 || row[i] > bestValue)) { best = i; bestValue = row[i]; }
      }
      return best;
    }
    const probs = softmax(processLogits(row, o));
    const cdf = new Float64Array(probs.length);
    let mass = 0;
    for (let i = 0; i < probs.length; i++) { mass += probs[i]; cdf[i] = mass; }
    const u = rng.uniform() * cdf[cdf.length - 1];
    let below = 0;
    for (const c of cdf) if (c <= u) below++;
    return Math.min(below, cdf.length - 1);
  }

  // -- text: code points, incremental UTF-8, stop texts (charrnn.tokens.TextStream and StopText) -------
  const codePoints = (text) => Array.from(text);

  class TextStream {
    constructor(tokenBytes, rows, length, skip) {
      this.tokenBytes = tokenBytes; this.length = length;
      this.decoders = Array.from({ length: rows }, () => new TextDecoder("utf-8"));
      this.skip = skip.slice(); this.chars = new Array(rows).fill(0);
    }
    push(ids) {
      return ids.map((id, r) => {
        const data = this.tokenBytes[id];
        const cut = Math.min(this.skip[r], data.length);
        this.skip[r] -= cut;
        const text = codePoints(this.decoders[r].decode(data.subarray(cut), { stream: true }))
          .slice(0, this.length - this.chars[r]);
        this.chars[r] += text.length;
        return text.join("");
      });
    }
    get done() { return this.chars.every((c) => c >= this.length); }
  }

  class StopText {
    constructor(stops, rows) {
      this.stops = stops.filter((s) => s);
      this.longest = Math.max(0, ...this.stops.map((s) => codePoints(s).length));
      this.held = new Array(rows).fill(""); this.finished = new Array(rows).fill(false);
    }
    push(pieces) {
      return pieces.map((piece, r) => {
        if (this.finished[r]) return "";
        const text = this.held[r] + piece;
        const hits = this.stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
        if (hits.length) {
          this.finished[r] = true; this.held[r] = "";
          return text.slice(0, Math.min(...hits));
        }
        const tail = this.openTail(text);
        this.held[r] = text.slice(text.length - tail.length);
        return text.slice(0, text.length - tail.length);
      });
    }
    openTail(text) {    // the longest end of text that a stop text starts with
      const points = codePoints(text);
      for (let k = Math.min(points.length, this.longest - 1); k > 0; k--) {
        const end = points.slice(points.length - k).join("");
        if (this.stops.some((s) => s.startsWith(end))) return end;
      }
      return "";
    }
    flush(r) { const tail = this.held[r]; this.held[r] = ""; return tail; }
    get allFinished() { return this.finished.every((f) => f); }
  }

  // -- vocabularies: characters, or a word / BPE tokenizer.json run by tokenizers.js ----------------
  function fromBase64(text) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
    const s = atob(text), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  class CharVocab {
    constructor(meta) {
      this.kind = "char";
      this.chars = codePoints(meta.chars);
      this.ids = new Map(this.chars.map((c, i) => [c, i + 1]));
      const utf8 = new TextEncoder();
      this.tokenBytes = [new Uint8Array(0), ...this.chars.map((c) => utf8.encode(c))];
      this.banned = [];
    }
    get size() { return this.tokenBytes.length; }
    hasNewline() { return this.ids.has("\n"); }
    encode(text) { return codePoints(text).map((c) => this.ids.get(c) ?? UNK_ID); }
    unknown(text) { return [...new Set(codePoints(text).filter((c) => !this.ids.has(c)))].sort(); }
    heal(text) { return { ids: this.encode(text), tail: null }; }
    stepsFor(length) { return length; }
    startingWith() { throw new CharrnnError("a character prompt is never healed"); }
  }

  class TokenVocab {
    constructor(meta, Tokenizer) {
      this.kind = meta.kind;
      this.tokenizer = new Tokenizer(meta.tokenizer, {});
      this.tokenBytes = meta.token_bytes.map(fromBase64);
      this.banned = meta.banned;
      this.masks = new Map();
    }
    get size() { return this.tokenBytes.length; }
    hasNewline() { return this.tokenBytes.some((b) => b.length === 1 && b[0] === 10); }
    encode(text) {      // tokenizers.js leaves a word its WordLevel model lacks without an id: [UNK], as in Python
      return this.tokenizer.encode(text, { add_special_tokens: false }).ids.map((id) => id ?? UNK_ID);
    }
    pieces(text) {      // the text each id covers (a word vocabulary: one pre-tokenized piece per id)
      return this.tokenizer.pre_tokenizer.pre_tokenize_text(text, {});
    }
    unknown(text) {
      if (this.kind !== "word") return [];     // a BPE vocabulary reads any UTF-8
      const ids = this.encode(text), pieces = this.pieces(text);
      const found = pieces.filter((p, i) => ids[i] === UNK_ID);
      if (found.length && ids[ids.length - 1] === UNK_ID && this.heal(text).tail) found.pop();
      return [...new Set(found)].sort();
    }
    heal(text) {        // charrnn.tokens.TokenVocab.heal: a prompt may end inside a token
      const ids = this.encode(text);
      if (ids.length < 2) return { ids, tail: null };
      const last = ids[ids.length - 1];
      const tail = last !== UNK_ID ? this.tokenBytes[last]
        : new TextEncoder().encode(this.pieces(text).at(-1));
      if (!this.startingWith(tail).some((m) => m)) return { ids, tail: null };
      return { ids: ids.slice(0, -1), tail };
    }
    startingWith(prefix) {
      const key = prefix.join(",");
      if (!this.masks.has(key)) {
        const mask = this.tokenBytes.map((b) => b.length >= prefix.length && prefix.every((v, i) => b[i] === v));
        for (const id of [UNK_ID, ...this.banned]) mask[id] = false;
        this.masks.set(key, mask);
      }
      return this.masks.get(key);
    }
    stepsFor(length) { return this.kind === "bpe" ? 4 * length : length; }
  }

  // -- options: charrnn.options' checks, with the same messages ------------------------------------
  const isInt = (v) => Number.isInteger(v);
  const CHECKS = {
    length: [(v) => isInt(v) && v >= 0, "must be >= 0"],
    numSamples: [(v) => isInt(v) && v > 0, "must be a positive integer"],
    temperature: [(v) => Number.isFinite(v) && v >= 0 && v <= 1e38,
      "must be >= 0 (0 means greedy) and at most 1e38"],
    topK: [(v) => isInt(v) && v > 0, "must be a positive integer"],
    topP: [(v) => Number.isFinite(v) && v > 0 && v <= 1, "must be in (0, 1]"],
    minP: [(v) => Number.isFinite(v) && v >= 0 && v <= 1, "must be in [0, 1] (0 is off)"],
  };

  function checkedOptions(options, defaults) {
    const o = { length: 1000, numSamples: 1, temperature: defaults.temperature ?? 1, topK: defaults.top_k ?? null,
      topP: defaults.top_p ?? null, minP: null, seed: null, stop: [], signal: null, label: null };
    for (const [name, value] of Object.entries(options || {})) {
      if (!(name in o)) throw new CharrnnError(`unknown option ${name}; the options are ${Object.keys(o).join(", ")}`);
      if (value != null) o[name] = value;
    }
    for (const [name, [ok, message]] of Object.entries(CHECKS)) {
      if (o[name] != null && !ok(o[name])) throw new CharrnnError(`${name} ${message}, got ${o[name]}`);
    }
    if (o.seed != null) {
      let seed;
      try { seed = BigInt(o.seed); } catch (e) { seed = -1n; }
      if (typeof o.seed === "number" && !isInt(o.seed)) seed = -1n;
      if (seed < 0n || seed >= (1n << 63n)) {
        throw new CharrnnError(`seed must be an integer from 0 to 2**63 - 1, got ${o.seed}`);
      }
      o.seed = seed;
    }
    o.stop = typeof o.stop === "string" ? [o.stop] : Array.from(o.stop);
    if (o.stop.some((s) => typeof s !== "string" || s === "")) {
      throw new CharrnnError("stop texts must be texts of one character or more");
    }
    return o;
  }

  // -- the model ---------------------------------------------------------------------------------
  const nextTask = () => new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });

  async function gunzip(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  class Model {
    constructor(meta, session, ort, vocab) {
      this.meta = meta; this.session = session; this.ort = ort; this.vocab = vocab;
      this.stateNames = meta.state;
      this.labels = meta.labels ? meta.labels.names : [];
      this.initialState = meta.labels && meta.labels.initial_state ? new Float32Array(
        fromBase64(meta.labels.initial_state).buffer) : null;
      const c = meta.model;
      this.info = { arch: c.arch, layers: c.layers, hidden: c.hidden, vocabulary: meta.vocab.kind,
        vocabSize: vocab.size, weights: meta.weights, bitsPerChar: meta.bits_per_char, charrnn: meta.charrnn,
        source: meta.source, labels: this.labels };
    }

    zeroState(batch, label = 0) {   // zeros, or the label's learned initial state (charrnn.runtime.zero_state)
      const c = this.meta.model, size = c.layers * c.hidden;
      return this.stateNames.map((_, k) => {
        const data = new Float32Array(c.layers * batch * c.hidden);
        if (this.initialState) {
          const start = (label * this.stateNames.length + k) * size;
          for (let l = 0; l < c.layers; l++) {
            const row = this.initialState.subarray(start + l * c.hidden, start + (l + 1) * c.hidden);
            for (let b = 0; b < batch; b++) data.set(row, (l * batch + b) * c.hidden);
          }
        }
        return new this.ort.Tensor("float32", data, [c.layers, batch, c.hidden]);
      });
    }

    labelIndex(label) {           // charrnn.runtime.ExportedModel.label_index: one label's name, or null
      if (label == null || label === "") return 0;
      if (!this.labels.length) {
        throw new CharrnnError("label applies to a model trained with --labels; this one has no labels");
      }
      const k = this.labels.indexOf(label);
      if (k < 0) {
        throw new CharrnnError(`label '${label}' is not one of the run's labels: ${this.labels.join(", ")}`);
      }
      return k;
    }

    async step(ids, state) {      // ids: numbers (batch) -> { logits: Float32Array (batch * vocab), state }
      const feeds = { ids: new this.ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [ids.length]) };
      this.stateNames.forEach((name, k) => { feeds[name] = state[k]; });
      const out = await this.session.run(feeds);
      return { logits: out.logits.data, state: this.stateNames.map((name) => out[`${name}_out`]) };
    }

    startText(prompt) {           // charrnn.options.start_text
      if (prompt !== "") return prompt;
      if (!this.vocab.hasNewline()) {
        throw new CharrnnError("prompt is empty and this vocabulary has no newline to start from; give some text " +
          "to continue");
      }
      return "\n";
    }

    /** The distinct characters (or words) of `prompt` the model does not know: they are read as [UNK]. */
    unknown(prompt) { return this.vocab.unknown(prompt); }

    async prime(text, label = 0) {   // charrnn.runtime.ExportedModel.prime, for one prompt
      const { ids, tail } = this.vocab.heal(text), offset = label * this.vocab.size;
      let state = this.zeroState(1, label), logits = null, last = performance.now();
      for (const id of ids) {
        ({ logits, state } = await this.step([id + offset], state));
        if (performance.now() - last > YIELD_MS) { await nextTask(); last = performance.now(); }
      }
      logits = Float32Array.from(logits);
      if (tail) {
        const allowed = this.vocab.startingWith(tail);
        allowed.forEach((ok, i) => { if (!ok) logits[i] = -Infinity; });
      }
      return { logits, state, skip: tail ? tail.length : 0 };
    }

    /** Stream a continuation of `prompt`: an async iterator of arrays, each sample's new text (one entry per
     * sample), until every sample has `length` characters or meets a stop text, or `signal` aborts. */
    async *stream(prompt, options) {
      const o = this.options(options);
      const text = this.startText(prompt);
      if (o.length === 0) return;
      const rows = o.numSamples, vocabSize = this.vocab.size;
      const rng = new PortableRandom(o.seed ?? randomSeed());
      const label = this.labelIndex(o.label), offset = label * vocabSize;
      const primed = await this.prime(text, label);
      const logits = new Float32Array(rows * vocabSize);
      for (let r = 0; r < rows; r++) logits.set(primed.logits, r * vocabSize);
      let state = primed.state.map((t) => this.repeat(t, rows));
      const out = new TextStream(this.vocab.tokenBytes, rows, o.length, new Array(rows).fill(primed.skip));
      const stops = new StopText(o.stop, rows);
      const finished = new Array(rows).fill(false), steps = this.vocab.stepsFor(o.length);
      let current = logits, last = performance.now();
      for (let i = 0; i < steps && !o.signal?.aborted; i++) {
        const ids = [];
        for (let r = 0; r < rows; r++) {
          const row = current.slice(r * vocabSize, (r + 1) * vocabSize);
          for (const b of this.vocab.banned) row[b] = -Infinity;
          ids.push(chooseRow(row, o, rng));
        }
        const shown = stops.push(out.push(ids));
        yield shown.map((text, r) => {     // charrnn.decoding.Decoding.read: a row ends at a stop or its length
          if (finished[r]) return "";
          if (stops.finished[r]) { finished[r] = true; return text; }
          if (out.chars[r] >= o.length || i === steps - 1) { finished[r] = true; return text + stops.flush(r); }
          return text;
        });
        if (finished.every(Boolean)) return;
        ({ logits: current, state } = await this.step(ids.map((id) => id + offset), state));
        if (performance.now() - last > YIELD_MS) { await nextTask(); last = performance.now(); }
      }
      if (o.signal?.aborted) yield finished.map((done, r) => (done ? "" : stops.flush(r)));
    }

    repeat(tensor, rows) {        // a (layers, 1, hidden) state for every row
      const [layers, , hidden] = tensor.dims, data = tensor.data;
      const out = new Float32Array(layers * rows * hidden);
      for (let l = 0; l < layers; l++) {
        for (let r = 0; r < rows; r++) out.set(data.subarray(l * hidden, (l + 1) * hidden), (l * rows + r) * hidden);
      }
      return new this.ort.Tensor("float32", out, [layers, rows, hidden]);
    }

    options(options) {            // checked, and the batch's memory within BATCH_BYTES
      const o = checkedOptions(options, this.meta.sampling), c = this.meta.model;
      this.labelIndex(o.label);
      const perRow = 4 * (this.vocab.size + this.stateNames.length * c.layers * c.hidden);
      if (o.numSamples * perRow > BATCH_BYTES) {
        throw new CharrnnError(`numSamples ${o.numSamples} needs ${Math.ceil(o.numSamples * perRow / 2 ** 20)} MB ` +
          `per step; give at most ${Math.floor(BATCH_BYTES / perRow)}`);
      }
      return o;
    }

    /** Complete texts: each sample's prompt and continuation. */
    async generate(prompt, options) {
      const texts = new Array(this.options(options).numSamples).fill(prompt);
      for await (const pieces of this.stream(prompt, options)) pieces.forEach((p, r) => { texts[r] += p; });
      return texts;
    }
  }

  function readFiles(files) {
    if (!files.wasm) {
      throw new CharrnnError("vendor/ort-wasm.js did not load (missing or damaged): export the model again");
    }
    const meta = files.model;
    if (meta === undefined) {
      throw new CharrnnError("model.js did not load (it is missing, damaged or not a model written by charrnn " +
        "export): export the model again with `charrnn export RUN --format web --out DIR`");
    }
    if (!meta || typeof meta !== "object" || meta.format === undefined || typeof meta.onnx !== "string") {
      throw new CharrnnError("model.js is not a model written by `charrnn export --format web`: export the model " +
        "again");
    }
    if (meta.format !== FORMAT_VERSION) {
      throw new CharrnnError(`model.js has format ${meta.format}, this page reads format ${FORMAT_VERSION}: ` +
        "export the model again with the same charrnn version as the page");
    }
    return meta;
  }

  async function createSession(ort, meta) {
    let bytes;
    try {
      bytes = await gunzip(fromBase64(meta.onnx));
    } catch (e) {
      throw new CharrnnError(`model.js is damaged (its model does not decode: ${e.message}): export the model again`);
    }
    try {
      // disable_quant_qdq: int8 weights become fp32 at load (web_export.FOLD_WEIGHTS; docs/web.md says why)
      return await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all",
        extra: { session: { disable_quant_qdq: "1" } } });
    } catch (e) {
      const first = String(e.message || e).split("\n")[0].slice(0, 200);
      throw new CharrnnError(`model.js is damaged (onnxruntime cannot load its model: ${first}): export the ` +
        "model again");
    }
  }

  async function checkGraph(model) {
    const want = ["ids", ...model.stateNames], got = model.session.inputNames;
    if (got.join() !== want.join()) {
      throw new CharrnnError(`model.js's graph reads ${got.join(", ")}, its description a ${model.info.arch} ` +
        `reading ${want.join(", ")}: the file was altered, export the model again`);
    }
    const { logits } = await model.step([UNK_ID], model.zeroState(1));
    if (logits.length !== model.vocab.size) {
      throw new CharrnnError(`model.js's graph scores ${logits.length} ids, its vocabulary has ` +
        `${model.vocab.size}: the file was altered, export the model again`);
    }
  }

  /** Load the model the page's model.js provided (or `files`: { model, wasm }); a CharrnnError says what is
   * wrong and how to fix it. */
  async function load(files = root.charrnnFiles || {}) {
    const meta = readFiles(files);
    const vendor = root.charrnnVendor;
    if (!vendor) {
      throw new CharrnnError("vendor/charrnn-vendor.js did not load (missing or damaged): export the model again");
    }
    const { ort, Tokenizer } = vendor;
    if (!ort.env.wasm.wasmBinary) {
      ort.env.wasm.wasmBinary = await gunzip(fromBase64(files.wasm));
      ort.env.wasm.numThreads = 1;    // threads need a cross-origin isolated page, which file:// never is
      ort.env.logLevel = "error";
    }
    let vocab;
    try {
      vocab = meta.vocab.kind === "char" ? new CharVocab(meta.vocab) : new TokenVocab(meta.vocab, Tokenizer);
    } catch (e) {
      throw new CharrnnError(`model.js is damaged (its vocabulary: ${e.message}): export the model again`);
    }
    const model = new Model(meta, await createSession(ort, meta), ort, vocab);
    await checkGraph(model);
    return model;
  }

  const api = { load, CharrnnError, PortableRandom, FORMAT_VERSION };
  root.charrnn = api;
  if (typeof module === "object" && module.exports) module.exports = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
