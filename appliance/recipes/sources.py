"""Source texts in, chunks out: the source-reliant end of the data spectrum (annotated and augmented data).

`read_sources` reads `.txt`, `.md` and `.jsonl` files or folders; a file that is binary, not UTF-8 or
empty is skipped with a reason and the rest goes on. `chunk_text` cuts a document into token-bounded,
paragraph-aware chunks whose offsets point back into the document, for lineage.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from ..errors import ApplianceError

SOURCE_SUFFIXES = (".txt", ".md", ".jsonl")
TOKENS_PER_WORD = 1.3


class SourceError(ApplianceError):
    """Source paths that do not exist or hold nothing readable."""


class SourceDoc(BaseModel):
    path: str
    title: str
    text: str = Field(description="the document, line endings normalized to \\n")
    sha256: str = Field(description="of the text, UTF-8")
    n_chars: int
    record: int | None = Field(default=None, description="line number in a JSONL file, else None")


Skipped = tuple[str, str]


def read_sources(paths: Iterable[str | Path], jsonl_field: str = "text") -> tuple[list[SourceDoc], list[Skipped]]:
    """Read files and folders (recursively, in sorted order) into documents, plus what was skipped and why.

    In a folder only `.txt`, `.md` and `.jsonl` files count (hidden files and folders are ignored); a
    file named explicitly is read as text whatever its extension, or as JSONL when it ends in `.jsonl`.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SOURCE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise SourceError(f"no .txt, .md or .jsonl files in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SourceError(f"source not found: {path}")
    docs: list[SourceDoc] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    for file in files:
        if file.resolve() in seen:
            continue
        seen.add(file.resolve())
        text, problem = _read_text(file)
        if text is None:
            skipped.append((str(file), problem))
        elif file.suffix.lower() == ".jsonl":
            _read_jsonl(file, text, jsonl_field, docs, skipped)
        else:
            docs.append(_doc(file, _title(file, text), text, None))
    if not docs:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise SourceError(f"nothing readable in the sources: {len(skipped)} skipped{first}")
    return docs, skipped


def _read_text(file: Path) -> tuple[str | None, str]:
    """The file's text with \\n line endings, or None and why it cannot be used."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if b"\x00" in data:
        return None, "binary file (contains NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    if not text.strip():
        return None, "empty file"
    return text.replace("\r\n", "\n").replace("\r", "\n"), ""


def _read_jsonl(file: Path, text: str, field: str, docs: list[SourceDoc], skipped: list[Skipped]) -> None:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append((where, f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            skipped.append((where, f"no string field {field!r}"))
        elif not value.strip():
            skipped.append((where, f"field {field!r} is empty"))
        else:
            title = record.get("title")
            title = title if isinstance(title, str) and title.strip() else f"{file.stem}:{number}"
            docs.append(_doc(file, title, value.replace("\r\n", "\n").replace("\r", "\n"), number))


def _title(file: Path, text: str) -> str:
    """A Markdown file's first `# heading`, else the file name without its extension."""
    if file.suffix.lower() == ".md":
        heading = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
        if heading:
            return heading.group(1)
    return file.stem


def _doc(file: Path, title: str, text: str, record: int | None) -> SourceDoc:
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return SourceDoc(path=str(file), title=title, text=text, sha256=sha, n_chars=len(text), record=record)


# ---------------------------------------------------------------------------------------------
# Chunking.


class Chunk(BaseModel):
    index: int
    text: str = Field(description="exactly document.text[start:end]")
    start: int
    end: int
    n_tokens: int


def approx_tokens(text: str) -> int:
    """A stand-in for a tokenizer: 1.3 tokens per whitespace-separated word, rounded up.

    Modern English prose runs about 1.3 tokens per word in common subword vocabularies, but text
    varies: Gemma 3's tokenizer gives 1.57 on tests/data/coriolanus-act1-excerpt.txt (verse line
    breaks and archaic spellings). Pass the model's own tokenizer to `chunk_text` wherever the limit
    matters.
    """
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
# Finer cuts for a piece over the limit, in order: after a sentence end, at a line break, between words.
_CUTS = (
    re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+"),
    re.compile(r"[^\S\n]*\n\s*"),
    re.compile(r"\s+"),
)


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _split(text: str, start: int, end: int, cut: re.Pattern[str]) -> list[tuple[int, int]]:
    """The non-blank pieces of text[start:end] between matches of `cut`, trimmed of whitespace."""
    pieces, pos = [], start
    for m in cut.finditer(text, start, end):
        pieces.append(_trim(text, pos, m.start()))
        pos = m.end()
    pieces.append(_trim(text, pos, end))
    return [p for p in pieces if p]


def chunk_text(
    text: str,
    max_tokens: int = 256,
    min_tokens: int = 32,
    count_tokens: Callable[[str], int] | None = None,
) -> list[Chunk]:
    """Cut `text` into chunks of at most `max_tokens`, keeping paragraphs (blank-line separated) whole.

    Consecutive paragraphs are merged while they fit. A paragraph over the limit is cut after sentence
    ends, a sentence over the limit at line breaks, and a line over the limit between words: a chunk
    never starts or ends inside a word. Overshoot, by design: a final chunk under `min_tokens` joins
    the previous one when the two stay within `max_tokens * 1.25`, and a single word longer than the
    limit is a chunk of its own. `count_tokens` defaults to `approx_tokens`.
    """
    if max_tokens < 1 or min_tokens < 0:
        raise ValueError(f"max_tokens must be positive and min_tokens not negative, got {max_tokens}, {min_tokens}")
    count = count_tokens or approx_tokens

    def units(start: int, end: int, level: int) -> list[tuple[int, int]]:
        if level == len(_CUTS) or count(text[start:end]) <= max_tokens:
            return [(start, end)]
        pieces = _split(text, start, end, _CUTS[level])
        if len(pieces) == 1:
            return units(start, end, level + 1)
        return [u for s, e in pieces for u in units(s, e, level + 1)]

    spans = [u for s, e in _split(text, 0, len(text), _PARAGRAPH_BREAK) for u in units(s, e, 0)]
    packed: list[tuple[int, int]] = []
    for start, end in spans:
        if packed and count(text[packed[-1][0] : end]) <= max_tokens:
            packed[-1] = (packed[-1][0], end)
        else:
            packed.append((start, end))
    if len(packed) > 1 and count(text[packed[-1][0] : packed[-1][1]]) < min_tokens:
        merged = (packed[-2][0], packed[-1][1])
        if count(text[merged[0] : merged[1]]) <= max_tokens * 1.25:
            packed[-2:] = [merged]
    return [
        Chunk(index=i, text=text[s:e], start=s, end=e, n_tokens=count(text[s:e])) for i, (s, e) in enumerate(packed)
    ]
