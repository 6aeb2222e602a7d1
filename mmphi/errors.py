"""Bad input, the same way in every stage: an error that names the file and record, or a counted, logged skip."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from mmphi import quiet_library_notices

SKIP_HINT = " (pass --skip_bad_records to skip and count such records)"
SCAN_HINT = " (pass --skip_bad_records to skip and count such records, --validate_data to scan a file up front)"


class BadRecordError(ValueError):
    """A data problem, always phrased as `location: what is wrong`."""


@dataclass
class SkipReport:
    """Bad records that were skipped (with --skip_bad_records), by reason, with the first few locations."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, location: str, reason: str) -> None:
        self.counts[reason.split(" (")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{location}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts (and examples, up to `max_examples`): a DataLoader worker's, another rank's."""
        self.counts.update(other.counts)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])

    def summary(self) -> str:
        if not self.total:
            return "no bad records"
        reasons = ", ".join(f"{n} x {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} bad record(s): {reasons}; first: " + "; ".join(self.examples)


def parse_json_object(raw: bytes | str) -> dict:
    """One JSON line -> a dict; BadRecordError says what is wrong (the caller adds file and line)."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise BadRecordError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadRecordError("JSON nested too deeply to read") from None
    if not isinstance(record, dict):
        raise BadRecordError(f"record is a JSON {type(record).__name__}, not an object")
    return record


def check_data_file(path: str, pattern: str) -> None:
    """A data file flag given a missing path or a folder: say which, and for a folder how to pass it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a file: give its files ({os.path.join(path, pattern)}), or "
                                f"the folder as --dataset_name {path} (read by datasets)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


def load_json(path: str):
    """A JSON file's content; invalid JSON is an error naming the file and line."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error


def handle_bad_record(location: str, error: Exception, skip_bad_records: bool, report: SkipReport,
                      log: logging.Logger | None = None, hint: str = SCAN_HINT) -> None:
    """Raise `location: error` (with the hint), or count the record in `report` (and log it when `log` is given)."""
    if not skip_bad_records:
        raise BadRecordError(f"{location}: {error}{hint}") from None
    report.add(location, str(error))
    if log is not None:
        log.warning("skipping a bad sample (%d so far): %s: %s", report.total, location, error)


def warn_skipped(log: logging.Logger, *reports: SkipReport) -> int:
    """One "Bad input" warning for the records skipped across `reports`; returns how many were skipped."""
    total = sum(report.total for report in reports)
    if total:
        log.warning("Bad input: %s", "; ".join(report.summary() for report in reports if report.total))
    return total


def validation_exit(path: str, n_good: int, report: SkipReport) -> int:
    """Print the result of a `--validate_data` scan; exit status 0 when the file is clean, 1 otherwise."""
    if not report.total:
        print(f"{path}: OK, {n_good} good record(s), no problems found")
        return 0
    counts = ", ".join(f"{n} x {reason}" for reason, n in report.counts.most_common())
    print(f"{path}: {n_good} good record(s), {report.total} bad: {counts}")
    for example in report.examples:
        print(f"  {example}")
    return 1


def run_command(main) -> None:
    """A command line's entry point (scripts/*.py). An error the user can act on (bad input, a missing or foreign
    file, a full disk: `ValueError`, `OSError`) prints as one line, `prog: error: ...`, exit status 1; Ctrl-C as one
    line, exit status 130. MMPHI_TRACEBACK=1 shows the traceback instead."""
    prog = os.path.basename(sys.argv[0])
    quiet_library_notices()
    try:
        main()
    except KeyboardInterrupt as interrupt:
        print(f"{prog}: interrupted" + (f": {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as error:
        if os.environ.get("MMPHI_TRACEBACK"):
            raise
        print(f"{prog}: error: {describe_error(error)}", file=sys.stderr)
        sys.exit(1)


def describe_error(error: Exception) -> str:
    """The error's own message, one line; a full disk said in words, with the file being written."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" (writing {error.filename})" if error.filename else ""
        return f"the disk is full{where}: free space or choose another output folder"
    return " ".join(str(error).split("\n")) or type(error).__name__

