"""Text sources → documents → fixed-length token sequences.

A data source is a `.txt` file (one document per line), a `.jsonl` file (one JSON object
per line, the document in `text_field`), or a folder of them read in sorted order.
Documents are tokenised without special tokens, then packed into sequences of
`context_size` tokens that all start with BOS:

- `concat`: every document's tokens followed by EOS, the stream cut into pieces of
  `context_size - 1` tokens, BOS prepended to each (the usual SAE recipe: no padding, so
  no wasted forward passes; documents may straddle sequences).  The final short piece is
  padded with `PAD` rather than dropped, so a small corpus still yields its tokens.
- `doc`: one document per sequence, BOS + its first `context_size - 1` tokens, padded with
  `PAD`.  Positions then line up with positions in the document (the toy corpus needs it).

`PAD` (-1) is never fed to the model (the harvester swaps it for BOS; causal attention
means padding after a document cannot change the document's activations) and never
counted as a training row.

Everything here is a generator, so a corpus larger than memory streams through, and the
same inputs always give the same sequences: resuming a harvest regenerates the stream and
skips the sequences already stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from saekit.errors import SaekitError
from saekit.tokens import PAD

PACKINGS = ("concat", "doc")
TEXT_SUFFIXES = (".txt", ".jsonl")


def data_files(data: str | Path) -> list[Path]:
    """The files a `--data` argument names: the file itself, or a folder's .txt/.jsonl files (sorted, recursive)."""
    if not str(data):
        raise SaekitError("no data given; pass --data FILE.txt, FILE.jsonl or a folder of them")
    p = Path(data)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise SaekitError(f"data folder {p} holds no .txt or .jsonl files; put documents there or pass a file")
        return files
    raise SaekitError(f"data {p} does not exist; pass an existing .txt/.jsonl file or folder")


def data_fingerprint(files: list[Path]) -> list[list]:
    """[name, size, hash of the first 64 KiB] per file: enough to notice a corpus changed under a resumed harvest."""
    out = []
    for f in files:
        with open(f, "rb") as fh:
            head = hashlib.sha256(fh.read(1 << 16)).hexdigest()[:16]
        out.append([f.name, f.stat().st_size, head])
    return out


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded strictly so a bad byte is reported where it is."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SaekitError(
                    f"{path} line {lineno} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    f"convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document in `files`, in order (JSONL: the `text_field` of each object)."""
    for path in files:
        jsonl = path.suffix == ".jsonl"
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            if not jsonl:
                yield line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaekitError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix the line or remove it") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise SaekitError(
                    f"{path} line {lineno} has no field {text_field!r} (has: {keys}); pass --text-field with the right name"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise SaekitError(f"{path} line {lineno}: field {text_field!r} is {type(text).__name__}, not text")
            if text.strip():
                yield text


def tokenize_documents(docs: Iterable[str], tokenizer, batch_docs: int = 256) -> Iterator[list[int]]:
    """Token ids of each document, without BOS/EOS (packing adds those); tokenised in batches for speed."""
    batch: list[str] = []

    def flush():
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        batch.clear()
        return ids

    for d in docs:
        batch.append(d)
        if len(batch) == batch_docs:
            yield from flush()
    if batch:
        yield from flush()


def pack_concat(token_docs: Iterable[list[int]], context_size: int, bos_id: int, eos_id: int) -> Iterator[np.ndarray]:
    """Docs joined with EOS, cut into `context_size - 1` pieces, BOS first; the last piece padded with PAD."""
    body = context_size - 1
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= body:
            yield np.array([bos_id, *buf[:body]], dtype=np.int32)
            del buf[:body]
    if buf:
        seq = np.full(context_size, PAD, dtype=np.int32)
        seq[0] = bos_id
        seq[1 : 1 + len(buf)] = buf
        yield seq


def pack_doc(token_docs: Iterable[list[int]], context_size: int, bos_id: int) -> Iterator[np.ndarray]:
    """One doc per sequence: BOS + its first `context_size - 1` tokens, padded with PAD (empty docs skipped)."""
    for ids in token_docs:
        if not ids:
            continue
        ids = ids[: context_size - 1]
        seq = np.full(context_size, PAD, dtype=np.int32)
        seq[0] = bos_id
        seq[1 : 1 + len(ids)] = ids
        yield seq


def sequences(
    data: str | Path,
    tokenizer,
    context_size: int,
    *,
    bos_id: int,
    eos_id: int,
    packing: str = "concat",
    text_field: str = "text",
) -> Iterator[np.ndarray]:
    """int32 `[context_size]` token sequences from a data source, in a fixed order."""
    if packing not in PACKINGS:
        raise SaekitError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
    token_docs = tokenize_documents(iter_documents(data_files(data), text_field), tokenizer)
    if packing == "concat":
        return pack_concat(token_docs, context_size, bos_id, eos_id)
    return pack_doc(token_docs, context_size, bos_id)
