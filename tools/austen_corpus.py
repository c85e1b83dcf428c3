"""The unseen corpus of benchmarks/finetune.py: the first 200,000 characters of Jane Austen's *Persuasion* (public
domain), from Debian's ``r-cran-janeaustenr`` package (the janeaustenr R package's texts of Project Gutenberg).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb deb
    pip install rdata          # reads R's serialised data; not a charrnn dependency
    python tools/austen_corpus.py deb --book persuasion --chars 200000 --out persuasion-200k.txt

The package keeps each novel as an R character vector (one line of text per element) in a lazy-load database
(``data/Rdata.rdx`` indexes ``data/Rdata.rdb``); the lines are joined with newlines, and the text is cut at the
end of the line that holds its ``--chars``-th character.
"""

import argparse
import gzip
import zlib
from pathlib import Path

DATA = "usr/lib/R/site-library/janeaustenr/data"


def book_lines(root: Path, book: str) -> list[str]:
    import rdata

    def unserialise(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = unserialise(gzip.decompress((root / DATA / "Rdata.rdx").read_bytes()))
    variables = {str(k): v for k, v in index["variables"].items()}
    if book not in variables:
        raise SystemExit(f"no book {book!r}; the package has {', '.join(sorted(variables))}")
    offset, length = (int(x) for x in variables[book])
    block = (root / DATA / "Rdata.rdb").read_bytes()[offset:offset + length]
    return ["" if line is None else str(line) for line in unserialise(zlib.decompress(block[4:]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the folder the .deb was extracted into")
    ap.add_argument("--book", default="persuasion")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    text = "\n".join(book_lines(Path(args.root), args.book)) + "\n"
    end = text.find("\n", args.chars)
    Path(args.out).write_text(text if end < 0 else text[: end + 1], encoding="utf-8")


if __name__ == "__main__":
    main()
