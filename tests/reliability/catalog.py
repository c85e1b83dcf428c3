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
    # -- crash consistency and full disks (test_crash.py) --

    # -- corrupt and foreign run files (test_files.py) --

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

    # -- server abuse (test_server.py) --

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
