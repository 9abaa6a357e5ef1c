"""Reading a benchmark from a local data root: required files, paths kept inside the root, one
record per line, and images decoded one at a time.

Nothing here downloads. A loader names the files it needs (``DataRoot.require``); a missing or
incomplete root fails with one ``DataRootError`` naming every missing file and where the official
release publishes it. A bad *record* (unparsable line, missing field, path leaving the root,
unreadable image) is not fatal: it becomes an ``Entry`` with an ``error``, which the runner
records as a failed sample.

Listing is cheap by construction: entries hold image *references* (a file path, base64 text, a
parquet row), never decoded images; ``ImageRef.load`` decodes one image when its sample runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from benchmarks.base import DataRootError, SampleError

# pyarrow: the lmms-lab releases are parquet shards; reading only the columns a listing needs keeps
# image bytes on disk until a sample runs (the ``datasets`` library would build an Arrow cache first).
try:  # imported lazily by the parquet reader; kept optional for the LLaVA layout
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - pyarrow is a declared dependency
    pq = None


@dataclass(frozen=True)
class Expected:
    """A file (or folder, or parquet shard glob) a layout needs, relative to the data root."""

    path: str
    what: str


class DataRoot:
    """A benchmark's local data folder.

    Args:
        path: the root (``benchmark.root``).
        benchmark: benchmark name, for messages.
        layout: ``llava`` or ``lmms_lab``, for messages.
        source: where the official release publishes the files (one line, shown in errors).
    """

    def __init__(self, path: str | Path, benchmark: str, layout: str, source: str) -> None:
        self.path = Path(path).expanduser()
        self.benchmark = benchmark
        self.layout = layout
        self.source = source

    def __repr__(self) -> str:
        return f"DataRoot({str(self.path)!r}, layout={self.layout!r})"

    def _present(self, expected: Expected) -> bool:
        if any(ch in expected.path for ch in "*?["):
            return bool(self.glob(expected.path))
        return (self.path / expected.path).exists()

    def require(self, expected: Sequence[Expected]) -> None:
        """Fail with one error naming every expected file that is missing."""
        missing = [e for e in expected if not self._present(e)]
        if missing:
            lines = "\n".join(f"  - {e.path}  ({e.what})" for e in missing)
            raise DataRootError(
                f"{self.benchmark}: data root {str(self.path)!r} (layout {self.layout!r}) is missing or "
                f"incomplete. Expected under it:\n{lines}\nGet them from: {self.source}\n"
                f"Set benchmark.root=<folder> (and benchmark.layout=llava|lmms_lab) to point at your copy."
            )

    def file(self, relative: str) -> Path:
        """A path the loader itself names (trusted)."""
        return self.path / relative

    def glob(self, pattern: str) -> list[Path]:
        """Files matching ``pattern`` below the root, sorted (parquet shards in shard order)."""
        return sorted(p for p in self.path.glob(pattern) if p.is_file())

    def inside(self, relative: Any, base: str = "") -> Path:
        """Resolve a path read from a data file; it must stay inside the root (no ``..``, absolute
        paths or symlinks leading out), else the record is malformed."""
        if not isinstance(relative, str) or not relative:
            raise SampleError(f"image path must be a non-empty string, got {relative!r}")
        if Path(relative).is_absolute():
            raise SampleError(f"image path {relative!r} is absolute; paths in data files must be relative "
                              f"to the data root {str(self.path)!r}")
        root = self.path.resolve()
        full = (self.path / base / relative).resolve()
        if not full.is_relative_to(root):
            raise SampleError(f"image path {relative!r} leads outside the data root {str(root)!r} (to {str(full)!r})")
        return full

    def load_json(self, relative: str) -> Any:
        """A whole JSON file the layout needs; an unreadable one is an incomplete root."""
        path = self.file(relative)
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise DataRootError(f"{self.benchmark}: cannot read {str(path)!r}: {error}. "
                                f"Get a fresh copy from: {self.source}") from None


def read_jsonl(path: Path) -> list[dict | str]:
    """One item per non-blank line: the parsed object, or an error message for a malformed line."""
    items: list[dict | str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as error:
                items.append(f"{path.name} line {number} is not valid JSON ({error})")
                continue
            items.append(value if isinstance(value, dict) else
                         f"{path.name} line {number} is a {type(value).__name__}, not a JSON object")
    return items


def require_fields(record: Mapping[str, Any], fields: Iterable[str], where: str) -> None:
    """Raise ``SampleError`` naming the fields ``record`` lacks."""
    missing = [f for f in fields if f not in record or record[f] is None]
    if missing:
        raise SampleError(f"{where} lacks field(s) {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class ImageRef(Protocol):
    """Where one sample's image lives; ``load`` decodes it (raising ``SampleError`` if it cannot)."""

    def load(self) -> Image.Image: ...


def decode_image(source: Path | bytes, what: str) -> Image.Image:
    """Fully decode an image to RGB (as LLaVA's ``Image.open(...).convert('RGB')``); a missing,
    truncated or corrupt image raises ``SampleError``."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise SampleError(f"image {what} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise SampleError(f"cannot decode image {what}: {error}") from None


@dataclass(frozen=True)
class FileImage:
    """An image file named by a data record, resolved inside the root when loaded."""

    root: DataRoot
    relative: Any
    base: str = ""

    def load(self) -> Image.Image:
        path = self.root.inside(self.relative, self.base)
        return decode_image(path, repr(str(Path(self.base) / str(self.relative))))


@dataclass(frozen=True)
class Base64Image:
    """An image stored as base64 text (MMBench's TSV)."""

    data: Any

    def load(self) -> Image.Image:
        if not isinstance(self.data, str) or not self.data:
            raise SampleError("image field is empty")
        try:
            raw = base64.b64decode(self.data, validate=False)
        except (binascii.Error, ValueError) as error:
            raise SampleError(f"image field is not valid base64: {error}") from None
        return decode_image(raw, "(base64 field)")


# ---------------------------------------------------------------------------------------------
# Parquet (the lmms-lab releases)
# ---------------------------------------------------------------------------------------------


class ParquetTable:
    """The rows of a set of parquet shards: chosen columns read at once, image bytes on demand.

    Args:
        files: the shards, in order.
        columns: columns to read for listing (those missing from the schema come back as None).
        cache_row_groups: how many row groups of image bytes to keep (samples usually run in
            order, so a row group is read once).
    """

    def __init__(self, files: Sequence[Path], columns: Sequence[str], cache_row_groups: int = 2) -> None:
        if pq is None:  # pragma: no cover
            raise ImportError("reading the lmms-lab layout needs pyarrow: pip install pyarrow")
        self.files = list(files)
        self.columns: dict[str, list[Any]] = {c: [] for c in columns}
        self._where: list[tuple[int, int, int]] = []  # (file, row group, row within group) per row
        self._cache: OrderedDict[tuple[int, int, str], list[Any]] = OrderedDict()
        self._cache_size = cache_row_groups
        for file_index, path in enumerate(self.files):
            try:
                handle = pq.ParquetFile(path)
                names = set(handle.schema_arrow.names)
                present = [c for c in columns if c in names]
                table = handle.read(columns=present)
            except Exception as error:  # pyarrow raises several types for a damaged file
                raise DataRootError(f"cannot read parquet shard {str(path)!r}: {error}") from None
            for column in columns:
                values = table.column(column).to_pylist() if column in present else [None] * table.num_rows
                self.columns[column].extend(values)
            for group in range(handle.metadata.num_row_groups):
                rows = handle.metadata.row_group(group).num_rows
                self._where.extend((file_index, group, r) for r in range(rows))

    def __len__(self) -> int:
        return len(self._where)

    def cell(self, row: int, column: str) -> Any:
        """One cell of a column that was not read for listing (an image), via a row-group cache."""
        file_index, group, position = self._where[row]
        key = (file_index, group, column)
        if key not in self._cache:
            try:
                table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=[column])
                self._cache[key] = table.column(column).to_pylist()
            except Exception as error:
                raise SampleError(f"cannot read column {column!r} of row {row} in "
                                  f"{self.files[file_index].name}: {error}") from None
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return self._cache[key][position]


def image_bytes(value: Any) -> bytes:
    """The encoded bytes of a ``datasets`` Image cell (``{"bytes", "path"}``), or the first of a list."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise SampleError("the image cell holds no image bytes")
    return bytes(value)


@dataclass(frozen=True)
class ParquetImage:
    """The image in ``column`` of one parquet row."""

    table: ParquetTable
    row: int
    column: str = "image"

    def load(self) -> Image.Image:
        data = image_bytes(self.table.cell(self.row, self.column))
        return decode_image(data, f"in row {self.row} of the parquet shards")


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One listed sample: everything but the decoded image, or the reason it cannot run."""

    id: str
    question: str = ""
    answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    image: ImageRef | None = None
    error: str | None = None


def failed_entry(id_: str, error: str | BaseException) -> Entry:
    return Entry(id=id_, error=str(error))


def make_ids_unique(entries: list[Entry]) -> list[Entry]:
    """A repeated id would break resume: later copies get ``<id>~<k>`` and fail as duplicates."""
    first: dict[str, int] = {}
    for position, entry in enumerate(entries):
        if entry.id not in first:
            first[entry.id] = position
            continue
        original, k = entry.id, 1
        while f"{original}~{k}" in first:
            k += 1
        entry.id = f"{original}~{k}"
        entry.error = f"duplicate id {original!r} (first at position {first[original]})"
        first[entry.id] = position
    return entries
