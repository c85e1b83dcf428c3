"""The exported web page's speed in headless Chromium, beside `charrnn generate --int8` and the torch-free runtime.

    python benchmarks/web_speed.py [--length 2000] [--repeats 3] [--busy 0 1] [--run DIR]

The default model (GRU 1024, embedding 256, vocabulary 66, random weights) unless --run names a trained run,
exported with `charrnn export --format web` twice (--int8, --fp32) and as .onnx files. For each page, each
repeat opens the page afresh from file:// and generates --length characters at batch 1 (prompt "ROMEO:",
temperature 1, the page's own form): the page's characters per second (its figure: characters over the time
from the click to the last one, the prompt's reading included), the time from navigation to the model being
ready, to the first character (ready + the click's first character: a user's click time left out), and the
folder's size. Beside them, in the same sitting and at batch 1: the PyTorch sampler with int8 weights
(`charrnn generate --int8`) and the torch-free runtime (`charrnn generate FILE.onnx`, fp32 and int8; onnxruntime's
default threads, one per core; the page runs one WebAssembly thread). --busy N: the same with N processes
spinning on the CPU beside it (users' machines are busy). Medians of the repeats; JSON on stdout.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine  # noqa: E402
from export_speed import measured_run, rate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from charrnn import runtime  # noqa: E402
from charrnn.export import export_onnx  # noqa: E402
from charrnn.sampling import Sampler  # noqa: E402
from charrnn.web_export import export_web  # noqa: E402
from tests.conftest import browser  # noqa: E402

PROMPT = "ROMEO:"


def _wait(driver, script: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(script)


def page_run(driver, folder: Path, length: int, seed: int) -> dict:
    """One fresh opening of the page and one generation through its form."""
    driver.get((folder / "index.html").as_uri())
    ready_ms = _wait(driver, "const p = window.charrnnPage; if (p && p.error) throw new Error(p.error); "
                             "return p && p.ready && p.readyMs")
    driver.execute_script(
        "for (const [id, v] of Object.entries(arguments[0])) document.getElementById(id).value = v",
        {"prompt": PROMPT, "length": str(length), "temperature": "1", "seed": str(seed), "samples": "1"})
    driver.find_element("id", "generate").click()
    run = _wait(driver, "const r = charrnnPage.lastRun; return r && r.finished && r")
    return {"chars_per_s": run["chars"] / run["seconds"], "ready_ms": ready_ms,
            "first_char_ms": ready_ms + run["firstPieceMs"]}


def python_rates(model, vocab, onnx_files: dict, length: int, seed: int) -> dict:
    """Batch-1 characters per second of charrnn generate --int8 and of the runtime (fp32, int8)."""
    makers = {"charrnn generate --int8": lambda: Sampler(model, vocab, weights="int8").stream_ids(
        [PROMPT], length, seed=seed)}
    for weights, path in onnx_files.items():
        lm = runtime.load(path)
        makers[f"runtime {weights}"] = lambda m=lm: m.stream_ids([PROMPT], length, seed=seed)
    return {name: rate(make(), 1)[0] for name, make in makers.items()}


def spinners(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="competing busy processes to try")
    p.add_argument("--run", help="a trained run directory (default: the default model, random weights)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="charrnn-web-bench-"))
    run, model, vocab = measured_run(args.run, tmp)
    pages, sizes, onnx_files = {}, {}, {}
    for weights in ("int8", "fp32"):
        result = export_web(run, tmp / f"page-{weights}", precision=weights)
        pages[weights], sizes[weights] = result.path, round(result.bytes / 1e6, 2)
        onnx_files[weights] = export_onnx(run, tmp / f"{weights}.onnx", int8=weights == "int8").path

    driver = browser()
    results = []
    try:
        page_run(driver, pages["int8"], 50, 0)                  # warm-up: the browser's first start
        python_rates(model, vocab, onnx_files, 50, 0)
        for busy in args.busy:
            procs = spinners(busy)
            try:
                samples: dict[str, list] = {}
                for r in range(args.repeats):
                    for weights, folder in pages.items():
                        samples.setdefault(f"page {weights}", []).append(page_run(driver, folder, args.length, r))
                    for name, chars in python_rates(model, vocab, onnx_files, args.length, r).items():
                        samples.setdefault(name, []).append({"chars_per_s": chars})
                    print(f"busy {busy} round {r + 1}/{args.repeats}: " + ", ".join(
                        f"{k} {v[-1]['chars_per_s']:,.0f}" for k, v in samples.items()), file=sys.stderr, flush=True)
            finally:
                for proc in procs:
                    proc.kill()
            for name, vals in samples.items():
                row = {"engine": name, "busy_processes": busy}
                for key in vals[0]:
                    row[key] = round(statistics.median(v[key] for v in vals), 1)
                row["chars_per_s_range"] = [round(min(v["chars_per_s"] for v in vals)),
                                            round(max(v["chars_per_s"] for v in vals))]
                results.append(row)
        version = driver.capabilities.get("browserVersion")
    finally:
        driver.quit()
    emit({"benchmark": "web_speed", "length": args.length, "repeats": args.repeats, "batch_size": 1,
          "parameters": model.num_parameters(), "folder_mb": sizes, "chromium": version, "results": results,
          **machine()})


if __name__ == "__main__":
    main()
