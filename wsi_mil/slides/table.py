"""Slide tables: ``slide_id,path[,label][,split]`` CSVs, the seed's ``labels.csv``, or paths/globs."""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_mil.errors import ConfigError

SPLITS = ("train", "val", "test")

#: what a slide table may look like (error hints and ``--slides`` help say the same)
TABLE_FORMS = (
    "a header row 'slide_id,path[,label][,split]', or two columns 'filename,label' "
    "with or without a header row (label 0, 1 or empty)"
)
LABEL_HINT = "labels must be binary (0/1); leave empty for unlabelled slides"


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: Path | None  # None: slide exists only as a feature store
    label: int | None = None
    split: str | None = None


def slide_id_from_path(path: str | os.PathLike) -> str:
    """File stem, also stripping multi-part suffixes like ``.ome.tiff`` / ``.ome.zarr``."""
    name = Path(str(path).rstrip("/")).name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a slide's files (``W/patches/<slide_id>.zarr``,
    ``<slide_id>.h5``, ...), or None if it can."""
    if any(c in slide_id for c in "/\\"):
        return "contains a path separator"
    if slide_id.startswith("."):
        return "starts with '.' (hidden and temporary files do)"
    if any(ord(c) < 32 for c in slide_id):
        return "contains a control character"
    return None


def check_slide_id(slide_id: str) -> None:
    """ConfigError when ``slide_id`` cannot name files (see :func:`slide_id_problem`)."""
    why = slide_id_problem(slide_id)
    if why is not None:
        raise ConfigError(
            f"slide_id {slide_id!r} {why}: slide ids name files (W/patches/<slide_id>.zarr)",
            "rename it in the slide table"
            + (", e.g. replace '/' with '_'" if "separator" in why else ""),
        )


def read_slide_table(
    csv: str | os.PathLike | None = None, paths: tuple[str, ...] | list[str] = ()
) -> list[SlideEntry]:
    """Entries from a slide-table CSV and/or slide paths and globs (slide_id = file stem).

    Relative paths in a CSV resolve against the CSV's folder. Slide ids must be unique.
    """
    entries: list[SlideEntry] = []
    if csv is not None:
        entries += _read_csv(Path(csv))
    for pat in paths:
        matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not matches:
            raise ConfigError(
                f"no slides match {pat!r}",
                "check the glob or quote it so the shell does not expand it",
            )
        for m in matches:
            entries.append(SlideEntry(slide_id_from_path(m), Path(m)))
    if not entries and csv is not None:
        raise ConfigError(
            f"slide table {csv} has no rows",
            f"add one row per slide under the header; a slide table has {TABLE_FORMS}",
        )
    if not entries:
        raise ConfigError("no slides given", "pass --slides CSV or slide paths/globs as arguments")
    seen: set[str] = set()
    for e in entries:
        check_slide_id(e.slide_id)
        if e.slide_id in seen:
            raise ConfigError(
                f"slide_id {e.slide_id!r} appears twice",
                "slide ids must be unique; rename one file or give ids in a CSV",
            )
        seen.add(e.slide_id)
    return entries


#: how to give slides without a table (hint when a slide or folder is given as the table)
SLIDES_AS_ARGUMENTS = (
    "pass slides as arguments instead (e.g. 'a.svs b.svs' or a quoted glob "
    "'slides/*.svs'), or list them in a CSV given to --slides"
)


#: slide tables larger than this are refused (a million slides take ~100 MB)
MAX_TABLE_BYTES = 512 << 20
#: a table's text by path, for pipes (``--slides <(...)``): a stage that reads its table
#: twice (heatmap) gets the same rows the second time
_PIPE_TEXT: dict[str, str] = {}  # _pipe_key -> text
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decompress(csv: Path, data: bytes) -> bytes:
    """``data`` decompressed when ``csv``'s suffix says so (.gz, .bz2, .xz, .zip, as pandas)."""
    import bz2
    import gzip
    import lzma
    import zipfile

    suffix = csv.suffix.lower()
    try:
        if suffix == ".gz":
            return gzip.decompress(data)
        if suffix == ".bz2":
            return bz2.decompress(data)
        if suffix == ".xz":
            return lzma.decompress(data)
        if suffix == ".zip":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                if len(names) != 1:
                    raise ConfigError(
                        f"slide table {csv} holds {len(names)} files, not one",
                        "zip the table alone, or give the CSV itself",
                    )
                return z.read(names[0])
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot decompress slide table {csv}: {e}") from None
    return data


def _table_text(csv: Path) -> str:
    """The table's text, read once (so a pipe such as ``--slides <(...)`` works too) and
    decompressed by suffix.

    A NUL byte near the start means an image (TIFF, JPEG, PNG, DICOM and CZI headers have
    them; UTF-8 text has none): refused before reading on. A UTF-8 byte-order mark (Excel's
    'CSV UTF-8') is dropped; other encodings are refused with how to save the file."""
    key = _pipe_key(csv)
    if key in _PIPE_TEXT:
        return _PIPE_TEXT[key]
    compressed = csv.suffix.lower() in (".gz", ".bz2", ".xz", ".zip")
    try:
        with open(csv, "rb") as f:
            head = f.read(4096)
            utf16 = head[:2] in _UTF16_BOMS
            if b"\0" in head and not (compressed or utf16):
                raise ConfigError(
                    f"--slides {csv} looks like an image, not a slide table (a CSV)",
                    SLIDES_AS_ARGUMENTS,
                )
            data = head + f.read(MAX_TABLE_BYTES + 1 - len(head))
    except OSError as e:
        raise ConfigError(f"cannot read slide table {csv}: {e.strerror or e}") from None
    if len(data) > MAX_TABLE_BYTES:
        raise ConfigError(
            f"--slides {csv} is over {MAX_TABLE_BYTES >> 20} MiB: not a slide table",
            SLIDES_AS_ARGUMENTS,
        )
    data = _decompress(csv, data) if compressed else data
    try:
        if data[:2] in _UTF16_BOMS:
            raise UnicodeDecodeError("utf-16", data, 0, 2, "a UTF-16 byte-order mark")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"slide table {csv} is not UTF-8 text (byte {e.start}: {e.reason})",
            "save it as UTF-8 (in Excel: 'CSV UTF-8')",
        ) from None
    if not csv.is_file():
        _PIPE_TEXT[key] = text
    return text


def _pipe_key(csv: Path) -> str:
    """The path and the pipe's identity (another pipe may later have the same /dev/fd path)."""
    try:
        st = csv.stat()
    except OSError:
        return str(csv)
    return f"{csv}:{st.st_dev}:{st.st_ino}"


def _check_field_counts(csv: Path, text: str) -> None:
    """ConfigError naming the first row with more fields than the first row (pandas would
    shift the columns of a header table, or fail with a parser error). Fewer fields are
    fine: missing trailing values are empty."""
    import csv as csv_module

    try:
        rows = ((i, r) for i, r in enumerate(csv_module.reader(io.StringIO(text)), 1) if r)
        first = next(rows, None)
        for row_no, row in rows:
            if len(row) > len(first[1]):
                raise ConfigError(
                    f"{csv} row {row_no}: {len(row)} fields where row {first[0]} has "
                    f"{len(first[1])}",
                    "remove the extra commas; quote values that contain commas",
                )
    except csv_module.Error:
        return  # reported by the pandas read below


def _parse_csv(csv: Path, text: str, **kw: Any) -> pd.DataFrame:
    """All-string DataFrame of the table's ``text`` (``kw``: more pandas options)."""
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, **kw)
    except pd.errors.EmptyDataError:
        raise ConfigError(
            f"slide table {csv} is empty", f"write one row per slide: {TABLE_FORMS}"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"cannot read slide table {csv}: {e}", f"it must be a CSV with {TABLE_FORMS}"
        ) from None


def _read_csv(csv: Path) -> list[SlideEntry]:
    if csv.is_dir():
        raise ConfigError(f"--slides {csv} is a folder, not a slide table", SLIDES_AS_ARGUMENTS)
    if not csv.exists():
        raise ConfigError(f"slide table {csv} does not exist", "check the --slides path")
    text = _table_text(csv)
    # relative paths: against the table's folder, or the current one for a pipe (/dev/fd)
    base = csv.parent if csv.is_file() else Path.cwd()
    _check_field_counts(csv, text)
    df = _parse_csv(csv, text)
    cols = [c.strip().lower() for c in df.columns]
    header_rows = 1  # file row of data row i: i + 1 + header_rows
    if "slide_id" not in cols:
        # Two columns filename,label: the seed's labels.csv (no header) or the same with a
        # header row of column names (see _is_two_column_header).
        df = _parse_csv(csv, text, header=None)
        if df.shape[1] != 2:
            raise ConfigError(
                f"{csv}: no 'slide_id' column and {df.shape[1]} column(s), not 2",
                f"use {TABLE_FORMS}",
            )
        df.columns = ["path", "label"]
        header_rows = 0
        if _is_two_column_header(list(df["path"]), list(df["label"])):
            df = df.iloc[1:].reset_index(drop=True)
            header_rows = 1
        df["slide_id"] = [slide_id_from_path(p) for p in df["path"]]
    else:
        df.columns = cols
    out = []
    for i, (_, row) in enumerate(df.iterrows()):
        row_no = i + 1 + header_rows
        sid = str(row["slide_id"]).strip()
        if not sid:
            raise ConfigError(
                f"{csv} row {row_no}: empty slide_id", "give every row a slide_id (or a path)"
            )
        p = str(row.get("path", "") or "").strip()
        path = None if not p else (Path(p) if Path(p).is_absolute() else base / p)
        hint = LABEL_HINT
        if row_no == 1 and not Path(p).suffix:  # headerless filename,label: a header?
            hint += (
                "; a first row of column names (e.g. 'filename,label') is read as a header "
                "when a row under it has a 0, 1 or empty label"
            )
        label = _parse_label(row.get("label", ""), csv, row_no, hint)
        split = str(row.get("split", "") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise ConfigError(
                f"{csv} row {row_no}: split {split!r} is not one of {', '.join(SPLITS)}",
                f"use one of {', '.join(SPLITS)}, or leave it empty",
            )
        out.append(SlideEntry(sid, path, label, split))
    return out


#: :func:`_label_value` of a value that is not a label
_BAD = object()


def _is_two_column_header(names: list[str], labels: list[str]) -> bool:
    """Whether the first row of a two-column ``filename,label`` table is a header: its
    second value is neither a label (0, 1, empty) nor a number (a bad label), its first is
    no file name (no suffix such as ``.svs``), and a row under it has a label (else a first
    slide with a mistyped label would be dropped silently)."""
    if not labels or _label_value(labels[0]) is not _BAD:
        return False
    try:
        float(str(labels[0]).strip())
        return False  # a number: a bad label ("2", "0.5"), not a column name
    except ValueError:
        pass
    if Path(str(names[0]).strip()).suffix:
        return False  # a slide's file ("a.svs"), not a column name
    return any(_label_value(v) is not _BAD for v in labels[1:])


def _label_value(v: object) -> object:
    """0, 1 or None (empty) for a label value, else ``_BAD``."""
    s = str(v if v is not None else "").strip()
    if s == "":
        return None
    try:
        f = float(s)
    except ValueError:
        return _BAD
    return int(f) if f in (0.0, 1.0) else _BAD


def _parse_label(v: object, csv: Path, row_no: int, hint: str = LABEL_HINT) -> int | None:
    """The label of file row ``row_no`` (1-based, header included): 0, 1 or None (empty)."""
    value = _label_value(v)
    if value is _BAD:
        s = str(v if v is not None else "").strip()
        raise ConfigError(f"{csv} row {row_no}: label {s!r} is not 0 or 1", hint)
    return value  # type: ignore[return-value]


def write_slide_table(entries: list[SlideEntry], csv: str | os.PathLike) -> None:
    """Write entries as a slide-table CSV (paths relative to the CSV's folder when possible)."""
    csv = Path(csv)
    rows = []
    for e in entries:
        p = ""
        if e.path is not None:
            try:
                p = os.path.relpath(e.path, csv.parent)
            except ValueError:
                p = str(e.path)
        rows.append(
            {
                "slide_id": e.slide_id,
                "path": p,
                "label": "" if e.label is None else e.label,
                "split": e.split or "",
            }
        )
    pd.DataFrame(rows, columns=["slide_id", "path", "label", "split"]).to_csv(csv, index=False)
