"""Reading examples: TSV/CSV/JSONL/JSON/plain-text files and ``datasets`` objects, as rows
(dicts from field name to value)."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from deltatune.core.json_input import parse_object
from deltatune.errors import ConfigError

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")


def read_rows(source: Any, limit: int | None = None) -> list[dict] | str:
    """The rows of ``source``; a ``.txt`` file comes back as one string (plain text to pack).

    ``source`` is a path, a list of dicts, or a ``datasets.Dataset``-like object (iterable of
    dicts with ``column_names``).
    """
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source), limit)
    if isinstance(source, dict) and source and all(isinstance(v, list) for v in source.values()):
        columns = list(source)  # a dict of columns, as datasets' to_dict() gives
        rows = [dict(zip(columns, values)) for values in zip(*source.values())]
        return rows[:limit] if limit else rows
    if hasattr(source, "__iter__") and not isinstance(source, (str, bytes, dict)):
        rows = []
        for i, row in enumerate(source):
            if limit is not None and i >= limit:
                break
            if not isinstance(row, dict):
                raise ConfigError(f"data rows must be mappings from field name to value, got {type(row).__name__}")
            rows.append(dict(row))
        return rows
    raise ConfigError(f"cannot read data from a {type(source).__name__}: give a file path "
                      f"({', '.join(SUFFIXES)}), a list of dicts or a datasets.Dataset")


def _read_file(path: Path, limit: int | None) -> list[dict] | str:
    if not path.is_file():
        hint = " (it is a folder: name the file inside it)" if path.is_dir() else ""
        raise ConfigError(f"data file {path} does not exist{hint}; check the path (a recipe's data.train / "
                          f"data.eval, or the --data argument of deltatune eval)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unknown data format {suffix or '(no suffix)'}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".txt":
            return path.read_text(encoding="utf-8")
        if suffix in (".tsv", ".csv"):
            return _read_table(path, "\t" if suffix == ".tsv" else ",", limit)
        if suffix == ".jsonl":
            return _read_jsonl(path, limit)
        return _read_json(path, limit)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc})") from None


def _read_table(path: Path, delimiter: str, limit: int | None) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(newline="", encoding="utf-8") as fh:
        # TSV files such as GLUE's hold bare quote characters inside sentences
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise ConfigError(f"{path} is empty: a header line with the field names is needed")
        rows = []
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            if None in row:
                raise ConfigError(f"{path}, line {reader.line_num}: more fields than the header names")
            rows.append(row)
        return rows


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            rows.append(parse_object(line, f"{path}, line {number}", ConfigError))
    return rows


def _read_json(path: Path, limit: int | None) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} or a dict of columns
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
        elif lists and len(lists) == len(data):
            return read_rows(data, limit)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"{path}: expected a JSON list of objects (one per example)")
    return data[:limit] if limit is not None else data


def column(rows: Iterable[dict], name: str, where: str) -> list:
    """The values of field ``name``; a clear error names the fields that do exist."""
    rows = list(rows)
    if rows and name not in rows[0]:
        raise ConfigError(f"{where} has no field {name!r}; its fields are {', '.join(map(str, rows[0]))}. "
                          f"Name the right ones: data.text / data.label in a recipe, --text / --label for "
                          f"deltatune eval")
    try:
        return [row[name] for row in rows]
    except KeyError:
        missing = next(i for i, row in enumerate(rows) if name not in row)
        raise ConfigError(f"{where}: example {missing} has no field {name!r}") from None
