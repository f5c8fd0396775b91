"""Image-caption tables as they are: CSV/TSV, Parquet, ``datasets`` folders and hub datasets
(data module ``table_captions``).

Each split is one ``*_data`` value, its form told by what it is:

- ``*.csv`` / ``*.tsv``: a column of image paths (relative to ``image_root``, default the
  file's folder) and a column of captions, open_clip's convention (``--csv-img-key
  filepath --csv-caption-key title`` is ``image_key: filepath, caption_key: title``). Rows
  that name the same image are one image with several captions. Read into memory.
- ``*.parquet`` files, a folder of them, a glob or brace pattern, or fsspec URLs
  (``s3://bucket/part-*.parquet``): **streamed** by row group, never whole in memory. The image
  column holds bytes, ``datasets``' ``Image`` struct (``{bytes, path}``) or paths; the caption
  column a string or a list of strings.
- a folder written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow), or an
  ``imagefolder`` with ``metadata.jsonl`` / ``metadata.csv`` as ``datasets`` defines it (its
  image column is ``image``), both read through ``datasets``.
- a hub dataset id (``owner/name``), online only: ``hub_splits`` maps the splits to the
  dataset's split names.

Relative image paths start from ``image_root``, default the table's own folder (each Parquet
file's folder).

Every form becomes a source of ``streams.SampleStream`` (Parquet row groups, or chunks of
``chunk_rows`` rows of an in-memory table), so epochs over ranks and workers, mid-epoch
resume, and bad rows (missing or undecodable image, missing, empty or wrongly typed caption,
an unreadable row group) are counted and budgeted exactly as for webdataset shards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmlightning.data_modules.streams import BadSample, StreamedCaptionData
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".parquet": "parquet"}
LOCAL_FORMS = ("a .csv/.tsv file, .parquet file(s) or a folder of them, a folder written by "
               "datasets' save_to_disk, or an imagefolder with metadata.jsonl/metadata.csv")


# ---------------------------------------------------------------------- one row
def row_captions(value: Any, where: str, column: str) -> list[str]:
    if value is None:
        raise BadSample("missing_caption", where, f"{column!r} is empty (null)")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "list holding non-strings"
        raise BadSample("bad_caption", where, f"{column!r} is a {kind}, not a string or a list of strings")
    captions = [c.strip() for c in value if c.strip()]
    if not captions:
        raise BadSample("empty_caption", where)
    return captions


def image_file(value: Any, where: str, column: str, root: str) -> bytes | str:
    """An image cell as its bytes (a bytes cell, or ``datasets``' Image struct ``{bytes, path}``
    holding them) or as the path of its file (relative paths under ``root``)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if value is None or value == "":
        raise BadSample("missing_image", where, f"{column!r} is empty")
    if not isinstance(value, str):
        raise BadSample("bad_image", where, f"{column!r} is a {type(value).__name__}, not bytes or a path")
    return value if "://" in value or os.path.isabs(value) or not root else os.path.join(root, value)


def read_bytes(path: str, where: str) -> bytes:
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:  # not there, unreadable, a folder, the network: the sample is skipped
        raise BadSample("missing_image", where, f"{path}: {type(err).__name__}") from None


def row_image(value: Any, where: str, column: str, root: str) -> bytes:
    found = image_file(value, where, column, root)
    return found if isinstance(found, bytes) else read_bytes(found, where)


class RowParser:
    """Turns a table row ``{image_key: ..., caption_key: ...}`` into (image bytes, captions)."""

    def __init__(self, image_key: str, caption_key: str, image_root: str) -> None:
        self.image_key, self.caption_key, self.image_root = image_key, caption_key, image_root

    def parse(self, row: dict[str, Any], where: str) -> tuple[bytes, list[str]]:
        captions = row_captions(row.get(self.caption_key), where, self.caption_key)
        return row_image(row.get(self.image_key), where, self.image_key, self.image_root), captions


def check_columns(columns: Sequence[str], wanted: dict[str, str], what: str, key: str) -> None:
    for recipe_key, column in wanted.items():
        if column not in columns:
            raise UserError(f"{key}: {what} has no column {column!r} (data.{recipe_key}); its columns are "
                            f"{', '.join(map(repr, columns))}.")


def folder_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


# ---------------------------------------------------------------------- Parquet, streamed
def expand_parquet(spec: str | list[str], key: str) -> list[str]:
    """Parquet files from a file, a folder (``*.parquet`` inside, recursively), a glob or
    brace pattern, fsspec URLs (globs too), or a list of these."""
    from braceexpand import braceexpand

    files: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        for one in braceexpand(str(item)):
            if "://" in one:
                import fsspec

                fs, _, paths = fsspec.core.get_fs_token_paths(one)
                if any(c in one for c in "*?["):
                    files += sorted(fs.unstrip_protocol(p) for p in paths)
                elif fs.isdir(paths[0]):
                    files += sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{paths[0]}/**/*.parquet"))
                else:
                    files.append(one)
            elif Path(one).is_dir():
                files += sorted(str(p) for p in Path(one).rglob("*.parquet"))
            elif any(c in one for c in "*?["):
                files += sorted(glob.glob(one, recursive=True))
            elif Path(one).is_file():
                files.append(one)
            else:
                raise UserError(f"{key}: {one!r} does not exist.")
    if not files:
        raise UserError(f"{key}: no .parquet files in {spec!r}.")
    return files


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[Any]:
    """A ``pyarrow.parquet.ParquetFile``, local or through fsspec, closed after use."""
    import pyarrow.parquet as pq

    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as handle:
            yield pq.ParquetFile(handle)
    else:
        with pq.ParquetFile(path) as file:
            yield file


class ParquetSource(RowParser):
    """Parquet row groups as the units of a sample stream: a reader reads one row group's two
    columns at a time (relative image paths resolved against that file's folder)."""

    def __init__(self, files: list[str], key: str, image_key: str, caption_key: str, image_root: str | None) -> None:
        import pyarrow as pa

        super().__init__(image_key, caption_key, "")
        self.damage = (OSError, pa.ArrowException)
        self.units: list[tuple[str, int, int, str]] = []  # (file, row group, its first row, image root)
        self.names, self.sizes = [], []
        for path in files:
            try:
                with parquet_file(path) as file:
                    meta, columns = file.metadata, file.schema_arrow.names
            except (OSError, pa.ArrowException) as err:
                raise UserError(f"{key}: {path} is not a readable Parquet file ({err}).") from None
            check_columns(columns, {"image_key": image_key, "caption_key": caption_key}, path, key)
            first = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                self.units.append((path, group, first, image_root or folder_of(path)))
                self.names.append(f"{path} row group {group}")
                self.sizes.append(rows)
                first += rows

    def read(self, unit: int, first: int, end: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
        path, group, row0, root = self.units[unit]
        with parquet_file(path) as file:
            table = file.read_row_group(group, columns=[self.image_key, self.caption_key])
        for offset, row in enumerate(table.slice(first, end - first).to_pylist()):
            where = f"{path} row {row0 + first + offset}"
            try:  # resolved here: the parser's root is one for all files
                row[self.image_key] = image_file(row[self.image_key], where, self.image_key, root)
            except BadSample:
                pass  # the parser meets it again and reports it
            yield first + offset, where, row


# ---------------------------------------------------------------------- in-memory tables
class RowNames:
    """Where row i is, for messages: ``"<table> row i"``, or a list of names."""

    def __init__(self, table: str, names: list[str] | None = None) -> None:
        self.table, self.names = table, names

    def __getitem__(self, i: int) -> str:
        return self.names[i] if self.names is not None else f"{self.table} row {i}"


class DatasetRows:
    """Rows ``[a:b]`` of a ``datasets.Dataset`` as dicts (a class, not a closure: loader
    workers that are spawned, not forked, receive it pickled)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: slice) -> list[dict[str, Any]]:
        columns = self.dataset[rows]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


class MemorySource(RowParser):
    """A table held in memory (or memory-mapped by Arrow), cut into chunks of ``chunk_rows``."""

    damage = (OSError,)

    def __init__(self, name: str, rows: Sequence[dict[str, Any]] | DatasetRows, where: RowNames, image_key: str,
                 caption_key: str, image_root: str, chunk_rows: int) -> None:
        super().__init__(image_key, caption_key, image_root)
        self.rows, self.where, self.chunk_rows = rows, where, chunk_rows
        starts = range(0, len(rows), chunk_rows)
        self.sizes = [min(chunk_rows, len(rows) - s) for s in starts]
        self.names = [f"{name} rows {s}-{s + n - 1}" for s, n in zip(starts, self.sizes)]

    def read(self, unit: int, first: int, end: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
        start = unit * self.chunk_rows
        for offset, row in enumerate(self.rows[start + first:start + end]):
            yield first + offset, self.where[start + first + offset], row


def read_csv_columns(path: str, key: str, wanted: dict[str, str], sep: str | None) -> dict[str, list[Any]]:
    """The ``wanted`` columns (recipe key -> column) of a CSV/TSV (local or an fsspec URL), every
    cell a string (a caption or label of digits stays text); empty cells are ''."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    sep = sep or ("\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ",")
    options = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True)  # quoted captions may hold newlines

    def opened() -> Any:
        if "://" in path:
            import fsspec

            return fsspec.open(path, "rb").open()
        return open(path, "rb")

    try:
        with opened() as f:
            head = pacsv.open_csv(f, parse_options=options).schema.names
        check_columns(head, wanted, path, key)
        with opened() as f:
            table = pacsv.read_csv(f, parse_options=options, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in head}, include_columns=list(wanted.values())))
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{key}: {path} is not a readable {'TSV' if sep == chr(9) else 'CSV'} file ({err}).") from None
    return {column: table.column(column).to_pylist() for column in wanted.values()}


def csv_source(path: str, key: str, image_key: str, caption_key: str, image_root: str | None, sep: str | None,
               chunk_rows: int) -> MemorySource:
    columns = read_csv_columns(path, key, {"image_key": image_key, "caption_key": caption_key}, sep)
    grouped: dict[str, int] = {}  # image path -> its row in the grouped table
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for line, (image, caption) in enumerate(zip(columns[image_key], columns[caption_key]), start=2):  # 1: header
        at = grouped.setdefault(image, len(rows)) if image else len(rows)
        if at == len(rows):
            rows.append({image_key: image, caption_key: []})
            names.append(f"{path} line {line} ({image})")
        rows[at][caption_key].append(caption)
    return MemorySource(path, rows, RowNames(path, names), image_key, caption_key, image_root or folder_of(path),
                        chunk_rows)


def load_with_datasets(kind: str, spec: str, key: str, hub_split: str) -> Any:
    """save_to_disk folders, imagefolders and hub ids, through the ``datasets`` library."""
    import datasets

    if kind == "save_to_disk":
        return datasets.load_from_disk(spec)
    if kind == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=spec, split="train")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f"{key}: {spec!r} would be a hub dataset, but the hub is offline (HF_HUB_OFFLINE=1). "
                        f"Give a local form: {LOCAL_FORMS}.")
    try:
        return datasets.load_dataset(spec, split=hub_split)
    except Exception as err:  # noqa: BLE001  (network, auth, a missing split: all end here)
        raise UserError(f"{key}: cannot load hub dataset {spec!r} split {hub_split!r}: "
                        f"{str(err).splitlines()[0]}. Local forms: {LOCAL_FORMS}.") from None


def undecoded(dataset: Any, name: str, key: str, wanted: dict[str, str]) -> Any:
    """One split of a ``datasets`` table, the ``wanted`` columns only, images left as
    ``{bytes, path}`` (``Image(decode=False)``)."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, dict)):
        raise UserError(f"{key}: {name} holds splits {', '.join(map(repr, dataset))}; give one split's folder "
                        f"(e.g. {name}/{next(iter(dataset))}).")
    check_columns(dataset.column_names, wanted, name, key)
    for column in wanted.values():
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset.select_columns(list(wanted.values()))


def table_kind(spec: Any, key: str = "data") -> str:
    """parquet | csv | save_to_disk | imagefolder | hub, from what ``spec`` is."""
    if not isinstance(spec, str):
        return "parquet"  # a list of Parquet files or patterns
    suffix = TABLE_SUFFIXES.get(Path(spec.split("?")[0]).suffix.lower())
    if "://" in spec or any(c in spec for c in "*?[{"):
        return suffix or "parquet"
    path = Path(spec)
    if path.is_file():
        if suffix:
            return suffix
        raise UserError(f"{key}: {spec!r} is not a table this reader knows ({LOCAL_FORMS}).")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "save_to_disk"
        if any(path.rglob("metadata.jsonl")) or any(path.rglob("metadata.csv")):
            return "imagefolder"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise UserError(f"{key}: {spec!r} is a folder, but none of {LOCAL_FORMS}.")
    if HUB_ID.match(spec) and not suffix and not spec.startswith("."):
        return "hub"
    raise UserError(f"{key}: {spec!r} does not exist; give {LOCAL_FORMS}, or a hub dataset id (owner/name).")


def open_table(spec: Any, key: str, image_key: str, caption_key: str, image_root: str | None = None,
               sep: str | None = None, hub_split: str = "train", chunk_rows: int = 1000) -> ParquetSource | MemorySource:
    """The source for one split's ``spec`` (see the module docstring); ``key`` names it in errors."""
    kind = table_kind(spec, key)
    if kind == "parquet":
        return ParquetSource(expand_parquet(spec, key), key, image_key, caption_key, image_root)
    if kind == "csv":
        return csv_source(spec, key, image_key, caption_key, image_root, sep, chunk_rows)
    wanted = {"image_key": image_key, "caption_key": caption_key}
    dataset = undecoded(load_with_datasets(kind, spec, key, hub_split), str(spec), key, wanted)
    local = kind != "hub"
    return MemorySource(str(spec), DatasetRows(dataset), RowNames(str(spec)), image_key, caption_key,
                        image_root or (str(spec) if local else ""), chunk_rows)


def read_rows(spec: Any, key: str, wanted: dict[str, str], sep: str | None = None,
              hub_split: str = "train") -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Every row of a table of any form, in memory, one row per table row (no grouping): the
    ``wanted`` columns (recipe key -> column), each row's location for messages, and the folder
    each row's relative image paths start from. For small tables (class labels, questions)."""
    kind = table_kind(spec, key)
    if kind == "csv":
        columns = read_csv_columns(spec, key, wanted, sep)
        n = len(next(iter(columns.values())))
        where, roots = [f"{spec}, line {i + 2}" for i in range(n)], [folder_of(spec)] * n
    elif kind == "parquet":
        columns, where, roots = {c: [] for c in wanted.values()}, [], []
        for path in expand_parquet(spec, key):
            with parquet_file(path) as file:
                check_columns(file.schema_arrow.names, wanted, path, key)
                table = file.read(columns=list(wanted.values()))
            for c in wanted.values():
                columns[c] += table.column(c).to_pylist()
            where += [f"{path} row {i}" for i in range(table.num_rows)]
            roots += [folder_of(path)] * table.num_rows
    else:
        dataset = undecoded(load_with_datasets(kind, spec, key, hub_split), str(spec), key, wanted)
        columns = {c: dataset[c] for c in wanted.values()}
        where = [f"{spec} row {i}" for i in range(len(dataset))]
        roots = [str(spec) if kind != "hub" else ""] * len(dataset)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return rows, where, roots


@DATA_MODULES.register("table_captions")
class TableCaptionData(StreamedCaptionData):
    """Image-caption pairs from CSV/TSV, Parquet, ``datasets`` folders or a hub dataset, for
    CLIP and captioning recipes (see the module docstring for the forms and keys)."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_data: Any,
                 val_data: Any = None, test_data: Any = None, image_key: str = "image", caption_key: str = "caption",
                 image_root: str | None = None, sep: str | None = None, chunk_rows: int = 1000,
                 hub_splits: dict[str, str] | None = None, mode: str = "epochs", samples_per_epoch: int | None = None,
                 batch_size: int = 256, eval_batch_size: int = 256, num_workers: int = 4, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.01, strict: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0),
                 shuffle_seed: int = 0) -> None:
        specs = {"train": train_data, "val": val_data, "test": test_data}
        super().__init__(tokenizer, max_length, image_config, specs, {split: f"{split}_data" for split in specs},
                         mode, samples_per_epoch, batch_size, eval_batch_size, num_workers, shuffle_buffer,
                         max_bad_fraction, strict, crop_scale, shuffle_seed)
        if chunk_rows < 1:
            raise UserError(f"data.chunk_rows must be >= 1, got {chunk_rows}.")
        self.image_key, self.caption_key, self.image_root, self.sep = image_key, caption_key, image_root, sep
        self.chunk_rows = chunk_rows
        self.hub_splits = {"train": "train", "val": "validation", "test": "test", **(hub_splits or {})}
        for split, spec in specs.items():  # a mistyped local path fails now, not after training
            if spec and table_kind(spec, f"data.{split}_data") == "parquet":
                expand_parquet(spec, f"data.{split}_data")

    def open_source(self, split: str) -> ParquetSource | MemorySource:
        return open_table(self.specs[split], f"data.{split}_data", self.image_key, self.caption_key, self.image_root,
                          self.sep, self.hub_splits[split], self.chunk_rows)
