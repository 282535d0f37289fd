"""Split the merged step-2/3 answer into the ``target`` and its visual ``attributes``.

Recognised shapes, tried in this order (``parse_status = "ok"``):

1. Labels: ``Target: the fire. Attributes: bright orange ...`` (also "Target entity:", "Visual attributes:", markdown
   bold).
2. Numbered items answering the two guidelines: ``(1) ... (2) ...``, ``1. ... 2. ...``, ``1) ... 2) ...``.
3. Prose: ``The user wants the fire from the image. The fire can be discriminated by ...`` (also "asker", "is asking
   for", "is looking for"), ``The target (entity) is ...``, ``The distinct physical object that the user wants is
   ...``, and ``The user wants the fire.`` without naming the image.

In 2 the target is the noun phrase named by a prose pattern inside item 1 when there is one (``the fire``), else item 1
itself; the attributes are item 2 and anything after it. In 3 the attributes are the text after the target's sentence.

Fallback (``parse_status = "fallback"``): the target is the first sentence and the attributes are the rest; an answer of
one sentence becomes the target with empty attributes; an empty answer gives two empty strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARSE_OK = "ok"
PARSE_FALLBACK = "fallback"

_IMAGE_WORD = r"(?:image|picture|photo|photograph|scene)"
_TARGET_PATTERNS = [
    # "The user wants the fire from the image", "the asker is asking for the red cup in this picture"
    re.compile(
        r"\b(?:user|asker|person|question|query)\s+(?:wants|want|is\s+asking\s+(?:for|about)|is\s+looking\s+for|"
        r"is\s+referring\s+to|refers\s+to|needs|is\s+interested\s+in)\s+(?:to\s+(?:find|see|identify|segment)\s+)?"
        r"(?P<target>.+?)\s+(?:from|in|within|of)\s+(?:the|this)\s+" + _IMAGE_WORD + r"\b",
        re.IGNORECASE,
    ),
    # "The target (entity|object|region) is the fire", "The distinct physical object that the user wants is the fire"
    re.compile(
        r"\b(?:target(?:\s+(?:entity|object|region|area|part))?"
        r"|distinct\s+physical\s+(?:object|area)s?(?:\s+\w+){0,8}?)"
        r"\s+(?:is|are)\s+(?P<target>[^.;\n]+)",
        re.IGNORECASE,
    ),
    # "The user wants the fire." (no image phrase)
    re.compile(
        r"\b(?:user|asker)\s+(?:wants|is\s+asking\s+for|is\s+looking\s+for|is\s+referring\s+to)\s+"
        r"(?P<target>[^.;:\n]+)",
        re.IGNORECASE,
    ),
]
_TARGET_LABEL = re.compile(
    r"(?:^|\n|\s)(?:target(?:\s+(?:entity|object|name|region|area|part))?)\s*:\s*(?P<target>.+?)\s*"
    r"(?=\n|(?:(?:visual\s+)?attributes?|description)\s*:|$)",
    re.IGNORECASE | re.DOTALL,
)
_ATTRIBUTES_LABEL = re.compile(
    r"\b(?:(?:visual\s+)?attributes?|description)\s*:\s*(?P<attributes>.+)$", re.IGNORECASE | re.DOTALL
)
# "(1)", "1.", "1)" at the start or after whitespace, followed by whitespace (so "1.5" is not a marker).
_ITEM_MARKER = r"(?:^|(?<=\s))(?:\({n}\)|{n}[.)])(?=\s)"
_LEADING_ATTRIBUTES_LABEL = re.compile(r"^(?:(?:visual\s+)?attributes?|description)\s*:\s*", re.IGNORECASE)
_TRAILING_MARKER = re.compile(r"\s*(?:\(\d\)|\b\d[.)])$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_LEADING_FILLER = re.compile(r"^(?:it\s+is|it's|this\s+is|that\s+is|there\s+is)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedAnswer:
    target: str
    attributes: str
    parse_status: str  # "ok" | "fallback"


def _clean(text: str) -> str:
    """Drop markdown emphasis and collapse spaces (newlines are kept: they separate labelled fields)."""
    text = text.replace("**", "").replace("__", "")
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r" *\n+ *", "\n", text).strip()


def _tidy(text: str) -> str:
    return " ".join(text.split()).strip(" \"'`").rstrip(" ,;:")


def _tidy_target(text: str) -> str:
    """Tidy, without the final period and without a dangling next-item marker ("the bottle. (2)")."""
    return _TRAILING_MARKER.sub("", _tidy(text)).rstrip(" .")


def _find_target_phrase(text: str) -> re.Match | None:
    for pattern in _TARGET_PATTERNS:
        match = pattern.search(text)
        if match and _tidy_target(match.group("target")):
            return match
    return None


def _sentence_end_after(text: str, position: int) -> int:
    """Index just past the sentence that contains ``position``."""
    match = _SENTENCE_END.search(text, position)
    return match.start() if match else len(text)


def _parse_labels(text: str) -> ParsedAnswer | None:
    target_match = _TARGET_LABEL.search(text)
    if not target_match or not _tidy_target(target_match.group("target")):
        return None
    attributes_match = _ATTRIBUTES_LABEL.search(text, target_match.end())
    attributes = attributes_match.group("attributes") if attributes_match else text[target_match.end():]
    return ParsedAnswer(_tidy_target(target_match.group("target")), _tidy(attributes), PARSE_OK)


def _parse_numbered(text: str) -> ParsedAnswer | None:
    first = re.search(_ITEM_MARKER.format(n=1), text)
    if not first:
        return None
    second = re.compile(_ITEM_MARKER.format(n=2)).search(text, first.end())
    if not second:
        return None
    item_one = text[first.end():second.start()]
    rest = text[second.end():]
    rest = re.sub(_ITEM_MARKER.format(n=r"\d"), " ", rest)  # "(3) ..." and later items stay in the attributes
    phrase = _find_target_phrase(item_one)
    target = phrase.group("target") if phrase else _LEADING_FILLER.sub("", item_one.strip())
    if not _tidy_target(target):
        return None
    rest = _LEADING_ATTRIBUTES_LABEL.sub("", rest.strip())
    return ParsedAnswer(_tidy_target(target), _tidy(rest), PARSE_OK)


def _parse_prose(text: str) -> ParsedAnswer | None:
    match = _find_target_phrase(text)
    if not match:
        return None
    attributes = text[_sentence_end_after(text, match.end("target")):]
    return ParsedAnswer(_tidy_target(match.group("target")), _tidy(attributes), PARSE_OK)


def _fallback(text: str) -> ParsedAnswer:
    flat = " ".join(text.split())
    sentences = _SENTENCE_END.split(flat, maxsplit=1)
    target = _LEADING_FILLER.sub("", sentences[0]) if sentences else ""
    attributes = sentences[1] if len(sentences) > 1 else ""
    return ParsedAnswer(_tidy_target(target), _tidy(attributes), PARSE_FALLBACK)


def parse_merged_answer(answer: str) -> ParsedAnswer:
    """Target and attributes of a merged step-2/3 answer; see the module docstring for the shapes and the fallback."""
    text = _clean(answer or "")
    if not text:
        return ParsedAnswer("", "", PARSE_FALLBACK)
    for parse in (_parse_labels, _parse_numbered, _parse_prose):
        parsed = parse(text)
        if parsed is not None:
            return parsed
    return _fallback(text)
