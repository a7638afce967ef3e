"""The bad-record policy: skip (counted, logged with the path) or stop with the path.

Records are checked when they are loaded (missing or unreadable image, empty report or
caption). What that cheap check misses (an image whose data is corrupt inside the file, a
hook's missing file) fails later, in the pipeline; there 'skip' replaces the record in
training and leaves it out of an evaluation (`data.transforms.Guard`), and the batch field
`BAD_FIELD` carries the reason code so the main process can count it. Records dropped by a
filter the user asked for (view, section, length) are not bad: they are counted separately
in `filtered`.

A reason is `'<key>: <details>'`; metrics count by key (`reason_key`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from medvlp_jax.data.images import check_image

POLICIES = ("skip", "error")
# Reason keys, in the order of their codes in BAD_FIELD (code = 1 + position; 0 = good).
REASONS = (
    "missing_image",
    "corrupt_image",
    "missing_report",
    "empty_text",
    "missing_mask",
    "other",
)
# Batch field int32 [B]: the code of the reason the element's record failed in the pipeline.
BAD_FIELD = "bad_record"

log = logging.getLogger(__name__)


def reason_key(reason: str) -> str:
    """'corrupt_image: JPEG end marker missing' -> 'corrupt_image'."""
    return reason.split(":", 1)[0].strip()


def reason_code(reason: str) -> int:
    """A reason -> its BAD_FIELD code (1 + position in REASONS; unknown keys -> 'other')."""
    key = reason_key(reason)
    return 1 + REASONS.index(key if key in REASONS else "other")


def code_reason(code: int) -> str:
    """A BAD_FIELD code (>= 1) -> its reason key."""
    return REASONS[int(code) - 1]


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"data.on_bad_record must be one of {POLICIES}, got {policy!r}")


class BadRecordError(ValueError):
    """A record that cannot be used, with the file that is wrong and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad record {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable, so worker processes can raise it
        return (BadRecordError, (self.path, self.reason))


@dataclasses.dataclass
class BadRecordReport:
    """What loading left out.

    Attributes:
      skipped: (path, reason) of each bad record skipped, in loading order.
      filtered: count of records left out by configured filters, by reason.
    """

    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def bad(self, policy: str, path: str, reason: str) -> None:
        """Handles one bad record: raise (policy 'error') or record and log it ('skip')."""
        check_policy(policy)
        if policy == "error":
            raise BadRecordError(path, reason)
        self.skipped.append((path, reason))
        log.warning("Skipping bad record %s: %s", path, reason)

    def filter(self, reason: str) -> None:
        self.filtered[reason] += 1

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Counters for the metrics log: skipped total, skipped (by reason key) and filtered
        by reason."""
        out = {f"{prefix}skipped": len(self.skipped)}
        by_key = collections.Counter(reason_key(r) for _, r in self.skipped)
        for key, count in sorted(by_key.items()):
            out[f"{prefix}skipped/{key}"] = count
        for reason, count in sorted(self.filtered.items()):
            out[f"{prefix}filtered/{reason}"] = count
        return out


def check_pair(data_cfg, report: BadRecordReport, image_path: str, text: str, where: str) -> bool:
    """Caption/manifest records: True if usable; else handled as bad or filtered.

    Empty text is a bad record (reported at `where`, the caption line or manifest row);
    text shorter than data.min_text_words is filtered; the image must pass check_image.
    """
    words = len(text.split())
    if words == 0:
        report.bad(data_cfg.on_bad_record, where, "empty_text: no caption/report text")
        return False
    if words < data_cfg.min_text_words:
        report.filter("short_text")
        return False
    reason = check_image(image_path, data_cfg.image_check)
    if reason is not None:
        report.bad(data_cfg.on_bad_record, image_path, reason)
        return False
    return True
