"""The models shipped inside the package, usable offline with nothing downloaded: ``charrnn models`` lists them, and
``charrnn.load(NAME)``, ``charrnn generate NAME``, ``charrnn eval NAME`` and ``charrnn train ... --init-from NAME``
take their names.  A file or folder of the same name in the working directory is the user's and wins.

Each lives in ``base_models/<folder>/`` as a run directory (config.json, vocab.json, model.safetensors) with its
model card (CARD.md), made by ``tools/make_base_model.py``.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "base_models"
# name -> (folder, what it is)
SHIPPED = {
    "base-en": ("en", "English character model (GRU 512) trained on public-domain Shakespeare, Nietzsche and War and "
                      "Peace; fine-tune it with --init-from base-en"),
}


def path(name) -> Path | None:
    """The folder of the shipped model called ``name`` (None: not a shipped model's name, or a file or folder of
    that name exists here, or this installation lacks its files)."""
    if not isinstance(name, str) or name not in SHIPPED or Path(name).exists():
        return None
    folder = FOLDER / SHIPPED[name][0]
    return folder if (folder / "config.json").is_file() else None


def resolve(name):
    """``name``'s shipped folder if it names a shipped model, else ``name`` unchanged."""
    return path(name) or name


def listing() -> list[dict]:
    """Each shipped model: its name, what it is, its folder and card, and whether its files are here."""
    return [{"name": name, "description": what, "path": str(FOLDER / folder),
             "card": str(FOLDER / folder / "CARD.md"), "available": (FOLDER / folder / "config.json").is_file()}
            for name, (folder, what) in SHIPPED.items()]
