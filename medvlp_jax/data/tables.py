"""The tables records are built from (MIMIC csv files, manifests), read with line numbers and
checked: missing label columns, duplicate ids, conflicting duplicates, unknown values.

Every problem is a message naming the file, the line(s), the column and the value.
`data.on_bad_csv` decides what happens: 'error' (default) raises TableError at the first kind
of problem found; 'warn' logs the problems and loading goes on: of rows with the same id the
first is kept, a missing label column reads as unknown (NaN), a row with an unknown value is
kept as it is (an unknown view is then not frontal).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

CSV_POLICIES = ("error", "warn")
# How many problems of one kind a warning lists (the rest are counted).
_SHOWN = 5

log = logging.getLogger(__name__)


class TableError(ValueError):
    """A csv / manifest that cannot be trusted, naming the file, line(s), column and value."""


@dataclasses.dataclass(frozen=True)
class Table:
    """The rows of one file.

    Attributes:
      path: the file.
      columns: the header's column names (JSONL: the first row's keys).
      rows: one dict per row.
      lines: the file line of each row (the header of a csv is line 1).
    """

    path: Path
    columns: tuple[str, ...]
    rows: list[dict]
    lines: list[int]

    def keep(self, positions: Sequence[int]) -> Table:
        """The table with only the rows at `positions` (in that order)."""
        return dataclasses.replace(
            self, rows=[self.rows[i] for i in positions], lines=[self.lines[i] for i in positions]
        )


def check_policy(policy: str) -> None:
    if policy not in CSV_POLICIES:
        raise ValueError(f"data.on_bad_csv must be one of {CSV_POLICIES}, got {policy!r}")


def read_csv_table(path: Path) -> Table:
    """A csv file (`.gz` compressed or not) with a header line."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", newline="") as f:
            text = f.read()
    else:
        text = path.read_text()
    reader = csv.DictReader(io.StringIO(text))
    rows, lines = [], []
    for row in reader:
        rows.append(row)
        lines.append(reader.line_num)
    return Table(path, tuple(reader.fieldnames or ()), rows, lines)


def report(policy: str, problems: list[str], fix: str) -> None:
    """Raises TableError with the first of `problems` ('error') or logs them ('warn').

    Args:
      policy: data.on_bad_csv.
      problems: messages naming file, line, column and value (none: nothing happens).
      fix: what data.on_bad_csv='warn' does instead, for the error message.
    """
    check_policy(policy)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
    if policy == "error":
        raise TableError(f"{problems[0]}{more}; data.on_bad_csv='warn' would {fix}")
    shown = "; ".join(problems[:_SHOWN])
    rest = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    log.warning("%s%s (data.on_bad_csv='warn': %s)", shown, rest, fix)


def check_columns(table: Table, needed: Sequence[str], policy: str, what: str) -> list[str]:
    """The columns of `needed` the table lacks, reported as problems.

    Args:
      needed: column names; what: what they are, for the message ('CheXpert label').
    """
    missing = [c for c in needed if c not in table.columns]
    if missing:
        message = f"{table.path}: missing {what} column(s) {missing}; has {list(table.columns)}"
        report(policy, [message], "read them as unknown (NaN) for every row")
    return missing


def check_values(table: Table, column: str, allowed: Collection[str], policy: str) -> None:
    """Rows whose `column` holds a value not in `allowed` are problems (kept under 'warn')."""
    problems = [
        f"{table.path} line {line}: column {column!r} has unknown value {row[column]!r}; "
        f"expected one of {sorted(allowed)}"
        for row, line in zip(table.rows, table.lines, strict=True)
        if column in row and (row[column] or "") not in allowed
    ]
    report(policy, problems, "load those rows anyway")


def cell(value):
    """A cell as rows are compared: numbers as float ('1.0', '1' and 1 alike), other text
    stripped, empty as None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _id(key: Sequence[str], row: dict) -> str:
    return ", ".join(f"{k}={row.get(k)!r}" for k in key)


def unique_rows(
    table: Table,
    key: Sequence[str],
    policy: str,
    *,
    may_differ: Collection[str] = (),
) -> Table:
    """The table with each `key` once: a repeated key is a problem, and the repeat is dropped.

    Cells are compared as `cell` reads them. A repeat is a 'duplicate' when it equals an
    earlier row of its key in every column, and 'conflicting' when it differs from the first
    row of its key in some column outside `may_differ` (the message names the columns and
    values). A repeat that differs only in `may_differ` columns is no problem and is kept (a
    manifest's several captions of one image).

    Args:
      key: the id columns.
      may_differ: columns in which rows of one key may differ.
    """
    kept: dict[tuple, list[int]] = {}
    keep, problems = [], []
    for i, row in enumerate(table.rows):
        k = tuple(row.get(c) for c in key)
        if k not in kept:
            kept[k] = [i]
            keep.append(i)
            continue
        problem = _repeat_problem(table, key, kept[k], i, may_differ)
        if problem:
            problems.append(problem)
        else:
            kept[k].append(i)
            keep.append(i)
    report(policy, problems, "keep the first row of each id")
    return table.keep(keep) if len(keep) < len(table.rows) else table


def _repeat_problem(table: Table, key, earlier: list[int], i: int, may_differ):
    """The message for row `i` repeating the key of rows `earlier`, or None if it may stay."""
    row, line = table.rows[i], table.lines[i]

    def differing(j: int, ignore: Collection[str] = ()) -> list[str]:
        other = table.rows[j]
        columns = sorted(set(row) | set(other))
        return [c for c in columns if c not in ignore and cell(row.get(c)) != cell(other.get(c))]

    same = next((j for j in earlier if not differing(j)), None)
    if same is not None:
        return (
            f"{table.path} line {line}: duplicate row for {_id(key, row)} "
            f"(the same as line {table.lines[same]})"
        )
    first = earlier[0]
    conflicts = differing(first, may_differ)
    if not conflicts:
        return None
    other = table.rows[first]
    values = ", ".join(f"{c} {other.get(c)!r} vs {row.get(c)!r}" for c in conflicts)
    return (
        f"{table.path} lines {table.lines[first]} and {line}: conflicting rows for "
        f"{_id(key, row)}: {values}"
    )
