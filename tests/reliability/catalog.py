"""The hostile user's probes: what each one tries, what charrnn must do, and what it does.

Every test in tests/reliability/ carries `@pytest.mark.probe("<id>")` for the probe(s) it checks; the
docs/reliability.md table is rendered from this list and the tests that carry each id, and
test_catalog.py fails when the page, the list or the marks disagree.  Regenerate the page with

    python -m tests.reliability.catalog > docs/reliability.md
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Probe:
    id: str
    area: str
    tries: str         # what the hostile user does
    expects: str       # what charrnn must do (and what the marked tests assert it does)


PROBES = [
    Probe("force-bad-option", "runs", "`train --force` with an impossible size, NaN or out-of-range option",
          "refused in one line, exit 2, before anything is deleted; the old run is untouched"),
    Probe("force-replaces", "runs", "`train --force` with valid options over an existing run",
          "the old run is replaced, nothing of it left over"),
    Probe("refused-new-run", "runs", "a new `--out` with an impossible option",
          "refused, and no folder left behind"),
    Probe("one-writer", "runs", "a second trainer (`--resume` or `--force`) on a run another process trains",
          "refused in one line naming the holder's pid; readers still generate; a dead holder's lock is taken over"),
    Probe("nan-propagates", "numerics", "a NaN weight on every backend (compiled, ATen, packed, stock)",
          "the same outputs are NaN on every backend: no fast path hides a NaN"),
    Probe("diverging-run", "numerics", "`--optimizer sgd --lr 1e30 --clip 0`",
          "the run stops in one line (exit 2) and no NaN weights are saved"),
    Probe("generate-sizes", "options", "`--num-samples`, `--length`, `--beam-width` past the machine's memory",
          "refused up front in one line naming the option and the memory here"),
    Probe("tiny-temperature", "options", "`--temperature 1e-7` and `1e-45`",
          "sampled greedily, exactly as `--temperature 0`"),
    Probe("min-p-hostile", "options", "`min_p` as NaN, an infinity, negative, past 1, huge, a string, a boolean, "
          "a list, through the library, `--min-p` (a run and an .onnx file), the runtime, `/v1/generate` and "
          "`/v1/completions`",
          "refused naming the option (one line, exit 2; 422; 400 with `param` `min_p`); 0, 1 and null honoured"),
    Probe("init-from-hostile", "options", "`--init-from` as an empty path, a FIFO, an .onnx file, another model's "
          "folder, a corpus file, a huge or missing path, a run with a damaged config, weights or vocabulary; a "
          "number or a list in the library",
          "refused in one line naming `--init-from` (exit 2; an OptionError), and the new run's folder not created"),
    Probe("hf-finetune-hostile", "options",
          "fine-tuning a Hugging Face model whose weights or tokenizer are damaged or whose tokenizer is another "
          "model's; `--lora` empty, 0, negative, NaN, a word, past the model's width; a fine-tuned run whose model "
          "folder or adapter config is damaged, or whose LoRA base changed",
          "training refused in one line naming the option, the new run's folder not created; loading the damaged "
          "run one line naming the file (or saying the base changed)"),
    Probe("web-export-hostile", "options",
          "`export --format web` into a file, a FIFO, a folder of other files, the run itself, an existing page "
          "without `--force`, a missing parent; from a damaged run or a fine-tuned Hugging Face run; killed "
          "mid-write; `--int8` with `--fp32`",
          "refused in one line (exit 2) and nothing written or changed; an interrupted export leaves the old page "
          "as it was and no partial folder"),
    Probe("web-page-hostile", "web page",
          "the exported page with `model.js` missing, truncated, foreign script, another format, a non-charrnn "
          "ONNX graph or damaged model bytes; another run's `model.js`; length, temperature, top-k, top-p, seed "
          "and samples negative, zero, fractional, huge or infinite; charrnn.js given unknown options or wrong "
          "types",
          "a readable message in the page naming the file or option and the fix, never a blank page or a stuck "
          "button; another run's model.js is simply that model; a bad option fails that generation only"),
    Probe("labels-hostile", "options",
          "`train --labels` on a plain file, a folder without label folders, an empty label folder, a label "
          "folder holding a FIFO or a non-UTF-8 file, a binary or damaged manifest, a manifest naming missing "
          "files, a label named with ',' or '='; `--label` empty-weighted, NaN, unknown, 10,000 characters, a "
          "mix, on a run without labels, in a server request and in the web page",
          "refused in one line (exit 2, a 400/422 naming `label`, a message in the page) naming the label or "
          "file and the known labels; nothing written; the requests beside it finish"),
    # -- crash consistency and full disks (test_crash.py) --
    Probe("kill-9", "crashes and disks",
          "`kill -9` of `train --resume --checkpoint-every 1` at 30 seeded random moments, mid-write included",
          "after every kill `generate`, `eval` and `export` load the run, `--resume` goes on and leaves nothing but "
          "run files; the run ends bit-identical to one never killed"),
    Probe("stale-temp-files", "crashes and disks",
          "temporary files of a killed writer (`.NAME.*.tmp`, safetensors' `.tmpXXXXXX`) in a run or a new `--out`",
          "readers ignore them, the next trainer deletes them; never taken for run files or foreign files"),
    Probe("file-mode", "crashes and disks", "run files written under a umask",
          "mode 0666 less the umask (they were 0600)"),
    Probe("disk-full-checkpoint", "crashes and disks",
          "a checkpoint on a full disk (a small tmpfs; a patched write where mounting is not allowed)",
          "one line, exit 2, the space needed and free and the `--resume` command; the last checkpoint intact, "
          "loadable and resumed once there is room"),
    Probe("disk-full-run-files", "crashes and disks",
          "a full disk writing config.json, vocab.json, metrics.jsonl, a sample or the best weights",
          "the same one line, exit 2; no temporary file, no half line in metrics.jsonl, the run resumable"),

    # -- corrupt and foreign run files (test_files.py) --
    Probe("damaged-run-file", "run files", "each run file (config.json, vocab.json, best/model.safetensors, "
          "trainer-state.pt) truncated, emptied, garbled, wrongly shaped JSON, or another run's, against `generate`, "
          "`eval`, `export`, `train --resume`, `report` and the loader of `serve`",
          "one line naming the file and what to do, exit 2, no traceback; the run is left byte for byte as it was"),
    Probe("pickle-payload", "run files", "a `trainer-state.pt` whose pickle would open a file or run `os.system`, "
          "and trainer states of the wrong shape",
          "never unpickled into code (`weights_only=True`); `--resume` refused in one line before it writes anything"),
    Probe("metrics-lines", "run files", "`metrics.jsonl` with a last line torn by a kill, or garbage in the middle",
          "a torn last line is dropped silently (`--resume` rewrites the file without it); garbage is refused in "
          "one line naming the file and line, by `--resume`, `report` and `plot`"),
    Probe("corpus-cache", "run files", "the encoded-corpus cache under `CHARRNN_HOME` garbled, emptied, truncated, "
          "out of range, or describing another corpus",
          "detected and encoded again: the same ids and the same `eval` loss as before"),
    Probe("onnx-metadata", "run files", "an `.onnx` file whose charrnn metadata is another run's (vocabulary, "
          "model), unparsable or wrongly typed; a damaged `.onnx` file",
          "refused in one line naming the file, nothing printed on stdout"),
    Probe("token-cache", "tokenizers", "the token-id cache of a word or BPE run (`$CHARRNN_HOME/encoded/tokens/`) "
          "garbled, emptied, truncated, its ids rewritten in range or out of range, or another corpus's",
          "detected (meta, span, length, range, checksum) and encoded again: the same ids and the same `eval` loss"),
    Probe("resume-other-corpus", "tokenizers", "`train --resume` of a char, word or BPE run on a corpus too short "
          "for its data position; on another corpus that holds it",
          "refused in one line, exit 2, before anything is written (the run byte for byte as it was); a corpus "
          "that holds the position trains on, warning how it is read"),
    Probe("undecodable-prompt", "tokenizers", "a prompt that is not UTF-8 (`$'ROMEO \\xf0\\x9f'`) to a word or BPE "
          "run and its `.onnx` file; `--json` with it",
          "each undecodable byte read as [UNK] with the usual warning, as a character run reads it; the JSON is "
          "UTF-8 (U+FFFD for those bytes)"),
    Probe("bpe-long-word", "tokenizers", "a BPE vocabulary learned from 400,000 letters without a space (27 s; "
          "a megabyte took 195 s, silently)",
          "pieces cut at 64 bytes: learned in about a second; the library's progress bars on a terminal"),
    Probe("unseen-bytes", "tokenizers", "a BPE model pushed toward ESC, a byte its training text never held, "
          "sampled, greedy, beam search and from its `.onnx` file",
          "never generated: only bytes of the training text come out"),
    Probe("vocab-kind", "tokenizers", "`vocab.json`'s `kind` changed (word <-> bpe), in its current format and in "
          "the first one (checksum of the tokenizer only)",
          "refused in one line naming tokenizer.json, the run unchanged; an older run's vocab.json still reads"),
    Probe("seed-range", "options", "`--seed 99999999999999999999999`, `--seed -1` and `2**63` for `train`, and for "
          "`generate` from a run and from an `.onnx` file",
          "refused in one line naming `--seed` and its range [0, 2**63); the largest seed generates"),

    # -- hostile corpora and options (test_corpora.py, test_options.py) --
    Probe("corpus-refused", "corpora", "as the corpus: an empty file, one character, random bytes, Latin-1, UTF-16 "
          "with a byte-order mark, a folder with no .txt files, a FIFO, /dev/zero, a symlink loop, an unknown "
          "corpus name",
          "refused in one line, exit 2, naming the problem and the fix (for another encoding: the iconv command); "
          "a FIFO or device is never opened; no run folder and nothing in the encoded cache left behind"),
    Probe("corpus-line-endings", "corpora", "NUL bytes, CR-only and CRLF line endings",
          "trains; every character is kept as written (the model learns the file's own line endings); "
          "`--newlines-to-spaces` makes each line ending, LF, CR or CRLF, one space"),
    Probe("corpus-changes", "corpora", "a corpus appended to, rewritten or deleted while it is encoded",
          "refused in one line, exit 2, naming the file that changed; no temporary file left"),
    Probe("corpus-disk-full", "corpora", "`CHARRNN_HOME` on a full filesystem (a 1 MB tmpfs), or filling up, while a "
          "corpus is encoded; `CHARRNN_HOME` a file",
          "refused in one line, exit 2, saying how much space it needs and where; no temporary file left "
          "(it was a bus error, exit 135)"),
    Probe("corpus-path-absolute", "corpora", "`charrnn eval RUN` from another directory than the one trained in",
          "the run records its corpus's absolute path and evaluates; an older run's relative path is taken from the "
          "current directory, and where it is not found, one line says to pass --corpus"),
    Probe("corpus-named-offline", "corpora", "an unknown corpus name; a named corpus with no network",
          "one line, exit 2, with the fix: a path, or the download address and `$CHARRNN_DATA`"),
    Probe("corpus-huge-line", "corpora", "a 50 MB corpus on one line",
          "trains, in under 1 GiB of memory (encoded in chunks)"),
    Probe("corpus-huge-vocab", "corpora", "a corpus of 100,000 distinct characters",
          "trains, in under 1.5 GiB of memory: evaluation cuts its logits into chunks (it took 3.7 GB)"),
    Probe("word-unk-bits-per-char", "tokenizers", "`--tokenizer word --max-vocab 2` on random letters, every word "
          "`[UNK]`; `eval`, its `--json`, training's validation and loss; a validation split or `eval --corpus` "
          "text of `[UNK]` only",
          "bits/char only over the text the model predicts (`[UNK]` targets and their characters left out: one bit "
          "a separator, not 0.2 bits/char), the unscored share printed and in `--json`; training reports eval's "
          "figure; nothing to score is refused in one line, before anything is written"),
    Probe("word-sampled-softmax", "tokenizers", "`--tokenizer word --max-vocab 12 --sampled-softmax 6` (`[UNK]` a "
          "frequent target), and a loss NaN at the first step",
          "trains (it was NaN at step 1: `[UNK]` had no proposal mass); its estimate tested against the full "
          "softmax; a first-step NaN is called a defect or bad input, not a divergence"),

    Probe("option-walk", "options", "NaN, inf, -inf, -1, 0, 10**23 and 1e30 for every numeric option of every "
          "command (train, generate, eval, serve, the tasks; `--dynamic-*` also with `eval --dynamic` and `generate "
          "--adapt`), the list read from the parser; `eval --corpus` and `generate --adapt` given a FIFO, "
          "`/dev/zero`, `/dev/null`, a folder, a missing, a Latin-1 or an empty file",
          "each refused in one line naming the option or its file (exit 2) or honoured (exit 0): no traceback, no "
          "hang, nothing past an 8 GiB address-space limit; NaN, -1 and the hostile files always refused, NaN and -1 "
          "before any work"),
    Probe("model-size", "options", "`--hidden 10000000`, `--layers 100000`, `--layers 10**23`",
          "refused before anything is allocated, with the memory a training step needs and the memory here"),
    Probe("sample-length", "options", "`--sample-length` past the memory here; SIGTERM while a long training "
          "sample is written",
          "refused before training; the signal cuts the sample short and the run stops at once, checkpointed "
          "(exit 130) and resumable"),
    Probe("sample-prompt", "options", "an empty `--sample-prompt` on a corpus without a newline; a sample that "
          "fails at the end of training",
          "refused before training, naming --sample-prompt; the final checkpoint is written before the last sample"),
    Probe("hf-damaged-file", "hugging face models", "a model folder's `tokenizer.json`, `model.safetensors` or "
          "`tokenizer_config.json` truncated, its `config.json` garbled, weights that lack a tensor, against "
          "`generate`, `eval` and `serve`",
          "one line naming the file (or the missing tensor), exit 2, nothing served; never random weights in place"),
    Probe("hf-encoder", "hugging face models", "a BERT folder (an encoder) given as a language model",
          "refused at load in one line: its predictions see the tokens they predict; a BERT made causal "
          "(`is_decoder`) generates"),
    Probe("hf-tokenizer-ids", "hugging face models", "a tokenizer with more ids than the model's embedding has rows",
          "refused at load in one line giving both sizes, before a rare word can crash generation"),
    Probe("hf-no-tokenizer", "hugging face models", "a model folder without its tokenizer files",
          "refused at load in one line naming the files that are missing; `serve` does not start"),
    Probe("hf-beam-length", "hugging face models", "`--beam-width 3` for 40 characters after a prompt, on a model "
          "with a 128-token context", "answered: the pass counting the beams' tokens stops at the length, and each "
          "beam's score is the model's log-probability of its tokens"),
    Probe("option-walk-hf", "hugging face models", "every numeric option of `generate`, `eval` and `serve` with NaN, "
          "±inf, -1, 0, 10**23 and 1e30, given a Hugging Face model folder",
          "refused in one line naming the option (exit 2) or honoured; no traceback, no hang"),
    Probe("int8-nan", "numerics", "a NaN or infinite activation in the int8 sampling step (AVX2 and portable "
          "kernels)", "every output of that sample is NaN, as in the PyTorch reference: no NaN hidden"),
    # -- dynamic evaluation, --adapt, the min cells and sampling's edges (test_dynamic_and_cells.py) --
    Probe("dynamic-segment", "dynamic evaluation", "`eval --dynamic` and `generate --adapt` with a "
          "`--dynamic-segment` at, past or just below the training split, or past the memory here",
          "refused in one line naming the largest segment the run allows (or the memory needed) before any work; "
          "the largest allowed is read"),
    Probe("adapt-file", "dynamic evaluation", "`generate --adapt` with a FIFO, `/dev/zero`, `/dev/null`, a folder, "
          "a missing file; a text of characters the model never saw; a long text",
          "regular files only, checked as a corpus file is: refused in one line without opening them; a warning "
          "for a text the model knows nothing of; a progress bar once adapting takes a while"),
    Probe("min-cells-bf16", "numerics", "minGRU / minLSTM under bf16 autocast (what `--precision auto` picks on "
          "CPUs with native bf16), over 1,000 steps",
          "the parallel scan equals the step-by-step recurrence (it was 100% off by step 1,000); training's "
          "validation loss is what `charrnn eval` gives"),
    Probe("huge-temperature", "options", "`--temperature 1e39` or `inf` (a run, an `.onnx` file, the library, "
          "both endpoints, `--sample-temperatures`)",
          "refused in one line (400 / 422 naming `temperature`) everywhere alike; 1e38 samples"),
    Probe("beam-length", "options", "`generate --beam-width` on word and BPE vocabularies",
          "every beam has the `--length` asked for (they had as many tokens as the greedy text, and fewer "
          "characters)"),
    Probe("onnx-finish-reasons", "options", "`generate FILE.onnx --json`",
          "`finish_reasons` as `generate RUN --json` gives them"),
    Probe("weights-bytes", "runs", "the same weights saved twenty times",
          "the same bytes each time: safetensors' metadata written sorted (its order was random)"),

    # -- server abuse (test_server.py) --
    Probe("server-hostile-json", "server", "bodies with a 5,000-deep JSON array, a 5,001-digit integer, a lone "
          "surrogate (`\\ud800`), invalid UTF-8, on both endpoints",
          "400 with the usual JSON error; a stream always ends with a `done` or `error` event"),
    Probe("server-escaped-prompt", "server", "a 2,000-emoji prompt written with `\\u` escapes; one character more; "
          "a body padded past the byte limit", "answered (the limit counts characters after decoding); 422 / 413 "
          "naming `--max-prompt-chars`"),
    Probe("server-long-prompt", "server", "a prompt of thousands of characters",
          "primed in pieces: memory is its ids, not activations per character; the same logits"),
    Probe("server-limits-fit", "server", "`serve --max-prompt-chars`, `--max-length`, `--max-connections` whose "
          "requests could not fit in memory together", "refused in one line (exit 2) naming them, before loading"),
    Probe("server-tiny-top-p", "server", "`top_p` 1e-300 (0 in float32)",
          "the most likely character, as greedy (it sampled from NaN: `zzzz...`)"),
    Probe("server-lying-length", "server", "a Content-Length shorter or longer than the body; a chunked body past "
          "the limit", "400 / 408 after `--max-read-seconds` / 413 (JSON, connection closed), never a hang"),
    Probe("server-slow-clients", "server", "200 connections sending a header byte a second, one sending nothing, "
          "a body that trickles, a body its endpoint never reads", "all closed after `--max-read-seconds`; an ordinary "
          "request answered meanwhile"),
    Probe("server-many-streams", "server", "300 concurrent streaming clients",
          "every stream ends with `done`, the library's text"),
    Probe("server-vanishing-clients", "server", "40 clients vanish mid-stream (FIN and RST) while 20 others ask",
          "the others are served; generation stops; connections, threads and jobs back to where they were"),
    Probe("server-static-traversal", "server", "`/static/../`, `%2e%2e%2f`, double-encoded, overlong UTF-8, "
          "backslash, NUL", "404 (or 400); nothing outside `static/` served"),
    Probe("server-odd-methods", "server", "TRACE, PROPFIND, PUT, OPTIONS, made-up methods on every route; "
          "garbage and TLS on the plain port", "405 with a JSON error; 400"),
    Probe("server-long-head", "server", "64 KiB URLs and headers, 1,000 headers",
          "414 / 431 with a JSON error (400 from uvicorn while a head is still arriving); long but legal URLs 404; "
          "the server goes on"),
    Probe("server-memory-flat", "server", "2,000 mixed valid and abusive requests",
          "the server's RSS within 30 MB of where it started (printed with `-s`)"),
    # -- request fields (test_endpoints.py) --
    Probe("server-empty-stop", "server", "an empty stop text (`\"stop\": [\"\"]`) while four requests generate, on "
          "`/v1/generate` and `/v1/completions`; `generate --stop \"\"`",
          "refused (422, and 400 naming `stop` in OpenAI's shape; one line, exit 2); the four finish with their "
          "seeded texts"),
    Probe("server-job-error-isolated", "server", "one request's decoding raising (an injected bug) while four "
          "generate beside it", "a 500 for that request alone; the four finish with their seeded texts"),
    Probe("server-prompt-list-queue", "server", "`{\"prompt\": [\"\"] * 5000, \"n\": 16}`; 16 prompts when the "
          "queue has room for 14", "400 naming `prompt`, or 503: nothing of the request queued, nothing left "
          "running, the next client served"),
    Probe("server-prompt-list-samples", "server", "`--max-samples 4` and `{\"prompt\": [\"\"] * 250, \"n\": 4}`",
          "400 naming `prompt` (or `n`): prompts x n count against `--max-samples`"),
    Probe("server-hf-context", "server", "a prompt longer than a Hugging Face model's context, served and in "
          "`generate`", "refused when the request is read (400 naming `prompt` / 422; `--prompt` in one line, exit "
          "2), nothing queued; it was a 500 after queueing"),
    Probe("openai-error-shape", "server", "23 invalid `/v1/completions` bodies through the official `openai` client",
          "`openai.BadRequestError` (400, `invalid_request_error`) with `param` in the API's names, no CLI flag"),
    Probe("server-request-walk", "server", "every field of `/v1/generate` and `/v1/completions` sent as a wrong "
          "type, null, huge, negative, NaN / Infinity, an empty string or list, a long string or list",
          "a 4xx JSON error naming the field (400 with `param` on `/v1/completions`) or the request honoured; never a "
          "500 or a hang; the server goes on"),
    Probe("openai-null-fields", "server", "`null` for every optional field of `/v1/completions`",
          "each field takes its default, as OpenAI's API does"),
    Probe("openai-echo-offsets", "server", "`echo` with `logprobs`, streamed and plain",
          "the same tokens and `text_offset`s, counted from the start of the echoed prompt"),
    Probe("server-cors-json", "server", "a CORS preflight from an origin not allowed",
          "400 with a JSON error, like every other error"),
    Probe("server-key-file-fifo", "server", "`serve --api-key-file FIFO`",
          "refused in one line, exit 2, at once (it blocked reading the FIFO)"),

]


def marked_tests() -> dict[str, list[str]]:
    """probe id -> ["file.py::test_name", ...], read from the `probe` marks in tests/reliability/."""
    found: dict[str, list[str]] = {}
    for path in sorted(HERE.glob("test_*.py")):
        pending: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            pending += re.findall(r'pytest\.mark\.probe\("([\w-]+)"\)', line)
            name = re.match(r"\s*def (test_\w+)", line)
            if name and pending:
                for probe in pending:
                    found.setdefault(probe, []).append(f"{path.name}::{name.group(1)}")
                pending = []
    return found


def render() -> str:
    tests = marked_tests()
    lines = [
        "# Reliability: the hostile user's probes",
        "",
        "charrnn's own hostile user is the `tests/reliability/` suite, run by CI. Each row below is one",
        "probe: what it tries, what charrnn must do, and the tests that assert it does (a failing test fails CI,",
        "so every row here holds on `main`). This page is rendered from `tests/reliability/catalog.py`:",
        "`python -m tests.reliability.catalog > docs/reliability.md`.",
        "",
    ]
    for area in dict.fromkeys(p.area for p in PROBES):
        lines += [f"## {area.capitalize()}", "", "| probe | tries | must | held by |", "|---|---|---|---|"]
        for p in (p for p in PROBES if p.area == area):
            held = "<br>".join(f"`{t}`" for t in tests.get(p.id, [])) or "**no test**"
            lines.append(f"| {p.id} | {p.tries} | {p.expects} | {held} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
