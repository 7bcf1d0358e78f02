"""Each bench script owns one marked section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

from pathlib import Path

BENCH_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(text: str, start: str, end: str, doc_path: Path = BENCH_DOC) -> None:
    """Replace what lies between `start` and `end` (both kept in `text`), or append it."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        doc = before + text + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    doc_path.write_text(doc)
