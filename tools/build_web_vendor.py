"""Build the third-party JavaScript of the exported web page into charrnn/web/vendor/ (package data).

    python tools/build_web_vendor.py            # npm ci, bundle, write the files and their manifest
    python tools/build_web_vendor.py --check    # the same into a temporary folder; fails if it differs

``web/package.json`` pins onnxruntime-web and @huggingface/tokenizers, and ``web/package-lock.json`` pins
them and esbuild with their registry checksums, which ``npm ci`` checks.  The step writes:

- ``charrnn-vendor.js``: ``web/vendor-entry.js`` bundled by esbuild as one classic script
  (``globalThis.charrnnVendor = {ort, Tokenizer}``), so that a page opened from disk loads it;
- ``ort-wasm.js``: onnxruntime-web's WebAssembly binary, gzip-compressed and base64-encoded in a script
  (``charrnnFiles.wasm``), which the page decompresses with the browser's DecompressionStream;
- ``LICENSES.txt``: the licenses of what the two files contain;
- ``manifest.json``: the versions, and the sha256 of the bundle and of the binary (tests/test_web_export.py
  checks the committed files against it).

It needs node and npm, and the npm registry; nothing else does: the built files are committed, so that
``pip install`` of charrnn sets the page up without either.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
VENDOR = ROOT / "charrnn" / "web" / "vendor"
WASM = "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm"
MIT_ONNXRUNTIME = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version(package: str) -> str:
    return json.loads((WEB / "node_modules" / package / "package.json").read_text())["version"]


def build(out: Path) -> dict:
    subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    bundle = out / "charrnn-vendor.js"
    subprocess.run([str(WEB / "node_modules" / ".bin" / "esbuild"), "vendor-entry.js", "--bundle", "--format=iife",
                    "--platform=browser", "--minify", "--legal-comments=eof", f"--outfile={bundle}"],
                   cwd=WEB, check=True)
    wasm = (WEB / "node_modules" / WASM).read_bytes()
    packed = base64.b64encode(gzip.compress(wasm, 9, mtime=0)).decode("ascii")
    (out / "ort-wasm.js").write_text(
        "// onnxruntime-web's WebAssembly binary, gzip + base64 (built by tools/build_web_vendor.py)\n"
        f'(globalThis.charrnnFiles = globalThis.charrnnFiles || {{}}).wasm = "{packed}";\n', encoding="ascii")
    tokenizers_license = (WEB / "node_modules" / "@huggingface" / "tokenizers" / "LICENSE").read_text()
    (out / "LICENSES.txt").write_text(
        f"charrnn-vendor.js and ort-wasm.js contain:\n\n== onnxruntime-web {version('onnxruntime-web')} "
        f"(https://github.com/microsoft/onnxruntime) ==\n\n{MIT_ONNXRUNTIME}\n"
        f"== @huggingface/tokenizers {version('@huggingface/tokenizers')} "
        f"(https://github.com/huggingface/tokenizers.js) ==\n\n{tokenizers_license}", encoding="utf-8")
    manifest = {
        "built_by": "tools/build_web_vendor.py",
        "packages": {p: version(p) for p in ("onnxruntime-web", "@huggingface/tokenizers", "esbuild")},
        "package-lock.json": sha256((WEB / "package-lock.json").read_bytes()),
        "charrnn-vendor.js": sha256(bundle.read_bytes()),
        "ort-wasm.js (decoded)": sha256(wasm),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="build into a temporary folder and compare")
    args = p.parse_args(argv)
    if not args.check:
        VENDOR.mkdir(parents=True, exist_ok=True)
        print(json.dumps(build(VENDOR), indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        committed = json.loads((VENDOR / "manifest.json").read_text())
        if fresh != committed:
            print(f"charrnn/web/vendor differs from a fresh build:\n{json.dumps(fresh, indent=2)}", file=sys.stderr)
            return 1
    print("charrnn/web/vendor matches a fresh build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
