// The libraries an exported page needs, as one classic script (globalThis.charrnnVendor), so the page
// also works opened from disk (file://), where Chromium loads neither ES modules nor fetch()ed files.
// onnxruntime-web's "wasm" build with its Emscripten glue bundled in; the .wasm binary reaches it as
// bytes (ort-wasm.js), never by URL.
import * as ort from "onnxruntime-web/wasm";
import { Tokenizer } from "@huggingface/tokenizers";

globalThis.charrnnVendor = { ort, Tokenizer };
