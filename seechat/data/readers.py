"""Readers: files and Hugging Face datasets in, raw records (dicts) out.

Records come out raw, not yet canonical: `normalize_sample` runs later, per sample, inside the
dataset, so one bad record in a 665K-sample file is skipped (or reported) alone instead of
failing the whole load. Only damage that makes the file itself unreadable - a malformed JSON
line - is handled here, with the file and line number in the error.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from seechat.data.schema import SampleError

logger = logging.getLogger("seechat.data")

OnError = Literal["raise", "skip"]


@dataclass
class ReadResult:
    """Records read from one file. `sources[i]` says where `records[i]` came from
    ("file:line" for JSONL, the file for a JSON list); `skipped` holds `(location, reason)`
    for every malformed line left out with on_error="skip"."""

    records: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped_ids(self) -> list[str]:
        return [location for location, _ in self.skipped]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _is_json_list(path: Path) -> bool:
    # A .json file may still be JSON Lines; the first non-blank byte tells them apart. Bytes,
    # not text: a file that is not UTF-8 must fail later with its line number, not here.
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf")
        while head:
            stripped = head.lstrip()
            if stripped:
                return stripped.startswith(b"[")
            head = f.read(4096)
    return False


def _decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` as text; a byte sequence that is not UTF-8 raises `SampleError` naming the file
    and line (readers would otherwise stop with a bare UnicodeDecodeError and no location)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data[: err.start].count(b"\n")
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = data[err.start : err.end].hex(" ")
        raise SampleError(
            f"{path}:{line}", f"line {line} is not UTF-8 text (bytes {bad} at column {column}); "
            "re-encode the file as UTF-8", file=str(path),
        ) from err


def iter_llava_records(
    path: str | os.PathLike, on_error: OnError = "raise", skipped: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield `(source, record)` for each record of a LLaVA-style JSON list or JSONL file.

    A malformed JSONL line (bad JSON, not UTF-8, or not an object) raises `SampleError` naming the file
    and line; with on_error="skip" it is logged and appended to `skipped` as
    `(f"{path}:{lineno}", reason)` instead. A malformed JSON list cannot be read past the
    error, so it always raises."""
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if _is_json_list(path):
        text = _decode_utf8(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise SampleError(
                f"{path}:{err.lineno}", f"malformed JSON: {err.msg} (column {err.colno})", file=str(path)
            ) from err
        for position, record in enumerate(records):
            if not isinstance(record, dict):
                raise SampleError(
                    str(position), f"item {position} is {type(record).__name__}, not an object", file=str(path)
                )
            yield str(path), record
        return

    with path.open("rb") as f:
        for lineno, raw_line in enumerate(f, start=1):
            if lineno == 1:
                raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")
            if not raw_line.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                # One line that is not UTF-8 is one bad record, like a line of bad JSON.
                line = _decode_utf8(raw_line, path, lineno)
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"line holds a {type(record).__name__}, not a JSON object")
            except ValueError as err:  # json.JSONDecodeError and SampleError are ValueErrors
                problem = err.problem if isinstance(err, SampleError) else f"malformed JSONL line {lineno}: {err}"
                if on_error == "raise":
                    raise SampleError(location, problem, file=str(path)) from err
                logger.warning("skipping %s: %s", location, problem)
                if skipped is not None:
                    skipped.append((location, problem))
                continue
            yield location, record


def read_llava_records(path: str | os.PathLike, on_error: OnError = "raise") -> ReadResult:
    """All records of a LLaVA JSON/JSONL file, with their sources and the skipped lines."""
    result = ReadResult()
    for source, record in iter_llava_records(path, on_error, result.skipped):
        result.records.append(record)
        result.sources.append(source)
    return result


def read_llava_json(path: str | os.PathLike, on_error: OnError = "raise") -> list[dict]:
    """The records of a LLaVA JSON (list) or JSONL file; see `iter_llava_records` for errors."""
    return read_llava_records(path, on_error).records


_BUILDERS_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_hf_dataset(
    path_or_name: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    data_files: str | list[str] | dict[str, Any] | None = None,
    **kwargs: Any,
) -> Iterable[dict]:
    """Raw records from `datasets.load_dataset`: a map-style `Dataset` (or an
    `IterableDataset` with `streaming=True`) whose rows are dicts.

    `path_or_name` may be a local .json/.jsonl/.parquet/.csv file (its builder is picked from
    the suffix), a builder name with `data_files` (e.g. "json"), a local dataset directory, or
    a Hub id. Extra keyword arguments (e.g. `cache_dir`) go to `load_dataset`."""
    import datasets  # imported here: `datasets` is slow to import and only this reader needs it

    source = str(path_or_name)
    suffix = Path(source).suffix.lower()
    if data_files is None and Path(source).is_file():
        if suffix not in _BUILDERS_BY_SUFFIX:
            raise ValueError(
                f"cannot tell the format of {source}; expected one of {sorted(_BUILDERS_BY_SUFFIX)}, "
                "or pass a builder name ('json', 'parquet', ...) with data_files="
            )
        source, data_files = _BUILDERS_BY_SUFFIX[suffix], source
    return datasets.load_dataset(source, split=split, streaming=streaming, data_files=data_files, **kwargs)
