"""Radiology report sections: parse 'HEADER:' sections and select the training text."""

from __future__ import annotations

import re

SECTIONS = ("findings", "impression")
SECTION_MODES = ("first", "concat")
# What a training example's text is: the selected sections, or one sentence of them drawn
# anew for each example and epoch (PTUnifier's released pre-training).
TRAIN_TEXTS = ("report", "random_sentence")
# A sentence ends at '.', '!' or '?' followed by whitespace (or the end of the text).
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s|$)|$)", re.DOTALL)
# A header is an upper-case phrase ending in ':' at the start of a line ("FINDINGS:").
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/&-]*[A-Z)]):", re.MULTILINE)


def parse_sections(report: str) -> dict[str, str]:
    """{lower-case header: whitespace-normalised section text} of a report."""
    matches = list(_HEADER.finditer(report))
    out = {}
    for m, nxt in zip(matches, [*matches[1:], None]):
        body = report[m.end() : nxt.start() if nxt else len(report)]
        name = " ".join(m.group(1).lower().split())
        text = " ".join(body.split())
        if name in out and text:  # a repeated header continues the section
            text = f"{out[name]} {text}".strip()
        out[name] = text or out.get(name, "")
    return out


def select_text(report: str, sections=SECTIONS, mode: str = "first", separator: str = " ") -> str:
    """The training text of a report.

    Args:
      report: the raw report.
      sections: section names in order of preference (subset of SECTIONS).
      mode: 'first' = the first non-empty section in `sections` order; 'concat' = all
        non-empty ones, joined with `separator` in that order.
      separator: what 'concat' puts between sections.

    Returns:
      The text ('' if none of the sections is present). A report without any 'HEADER:'
      line is taken whole (some reports are free text).
    """
    sections = tuple(sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"data.sections must be a non-empty subset of {SECTIONS}, got {sections}")
    if mode not in SECTION_MODES:
        raise ValueError(f"data.section_mode must be one of {SECTION_MODES}, got {mode!r}")
    parsed = parse_sections(report)
    if not parsed:
        return " ".join(report.split())
    texts = [parsed[s] for s in sections if parsed.get(s)]
    if not texts:
        return ""
    return texts[0] if mode == "first" else separator.join(texts)


def sentence_starts(text: str) -> list[int]:
    """Character offsets where the sentences of `text` start (empty text: none)."""
    return [m.start() for m in _SENTENCE.finditer(text)]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped, in order."""
    return [m.group().strip() for m in _SENTENCE.finditer(text)]
