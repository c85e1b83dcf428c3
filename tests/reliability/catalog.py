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

    Probe("option-walk", "options", "NaN, inf, -inf, -1, 0, 10**23 and 1e30 for every numeric option of every "
          "command (train, generate, serve, the tasks), the list read from the parser",
          "each refused in one line naming the option (exit 2) or honoured (exit 0): no traceback, no hang, nothing "
          "past an 8 GiB address-space limit; NaN and -1 always refused before any work"),
    Probe("model-size", "options", "`--hidden 10000000`, `--layers 100000`, `--layers 10**23`",
          "refused before anything is allocated, with the memory a training step needs and the memory here"),
    Probe("seed-range", "options", "`--seed 99999999999999999999999` and `--seed -1` (train, generate)",
          "one line naming --seed and its range, 0 to 2**64 - 1"),
    Probe("sample-length", "options", "`--sample-length` past the memory here; SIGTERM while a long training "
          "sample is written",
          "refused before training; the signal cuts the sample short and the run stops at once, checkpointed "
          "(exit 130) and resumable"),
    Probe("sample-prompt", "options", "an empty `--sample-prompt` on a corpus without a newline; a sample that "
          "fails at the end of training",
          "refused before training, naming --sample-prompt; the final checkpoint is written before the last sample"),
    Probe("int8-nan", "numerics", "a NaN or infinite activation in the int8 sampling step (AVX2 and portable "
          "kernels)", "every output of that sample is NaN, as in the PyTorch reference: no NaN hidden"),

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
