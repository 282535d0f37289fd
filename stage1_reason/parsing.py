"""Split a step-2 or merged step-2/3 answer into the ``target`` and its visual ``attributes``.

Recognised shapes, tried in this order (``parse_status = "ok"``):

1. Labels: ``Target: the fire. Attributes: bright orange ...`` (also "Target entity:", "Visual attributes:", markdown
   bold).
2. Numbered items answering the two guidelines: ``(1) ... (2) ...``, ``1. ... 2. ...``, ``1) ... 2) ...``.
3. Prose, in the wordings LLaVA-1.5 writes (paper Sec. 3.2 and Figure 4):

   - ``The target entity in the image is the piano bench.``, ``The target in the image is ...``, ``In the image, the
     target is ...``, ``The target (entity|object|region) is ...``;
   - ``The object that the asker wants from the image is the piano bench``, ``The distinct physical object that the
     user wants is ...``;
   - ``The user wants the fire from the image.`` (also "asker", "is asking for", "is looking for", and without naming
     the image).

In 2 the target is the noun phrase named by a prose pattern inside item 1 when there is one (``the fire``), else item 1
itself; the attributes are item 2 and anything after it. In 3 the target ends at a following clause (``, which ...``,
``, located ...``), and the attributes are that clause and everything after it, or else the text after the target's
sentence.

Fallback (``parse_status = "fallback"``): the target is the first sentence and the attributes are the rest; an answer of
one sentence becomes the target with empty attributes; an empty answer gives two empty strings.

In cot_steps 3 the merged answer is embedded as written (see ``prompts.seg_text``); the parse is for display and for the
step-1+2 ablation, whose embedded text is the target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARSE_OK = "ok"
PARSE_FALLBACK = "fallback"
PARSER_VERSION = 2  # part of the stage-1 run key: a parser that reads answers differently makes different rows

_IMAGE_WORD = r"(?:image|picture|photo|photograph|scene)"
_IMAGE_PHRASE = r"(?:from|in|within|of)\s+(?:the|this)\s+" + _IMAGE_WORD + r"\b"
_WANTS = (
    r"(?:wants|want|is\s+asking\s+(?:for|about)|asks\s+for|is\s+looking\s+for|is\s+referring\s+to|refers\s+to|needs|"
    r"is\s+interested\s+in)"
)
_WHO = r"(?:user|asker|person|question|query)"
_TARGET_PATTERNS = [
    # "The object that the asker wants from the image is the piano bench",
    # "The distinct physical object that the user wants is the knife"
    re.compile(
        r"\b(?:objects?|entit(?:y|ies)|areas?|regions?|parts?|things?)\s+(?:that|which)\s+the\s+" + _WHO + r"\s+"
        + _WANTS + r"(?:\s+" + _IMAGE_PHRASE + r")?\s+(?:is|are)\s+(?P<target>[^.;\n]+)",
        re.IGNORECASE,
    ),
    # "The user wants the fire from the image", "the asker is asking for the red cup in this picture"
    re.compile(
        r"\b" + _WHO + r"\s+" + _WANTS + r"\s+(?:to\s+(?:find|see|identify|segment)\s+)?"
        r"(?!" + _IMAGE_PHRASE + r")(?P<target>.+?)\s+" + _IMAGE_PHRASE,
        re.IGNORECASE,
    ),
    # "The target entity in the image is the piano bench", "In the image, the target is ...", "The target is ..."
    re.compile(
        r"\btarget(?:\s+(?:entity|entities|object|objects|region|area|part))?(?:\s+" + _IMAGE_PHRASE + r")?"
        r"\s+(?:is|are)\s+(?P<target>[^.;\n]+)",
        re.IGNORECASE,
    ),
    # "The user wants the fire." (no image phrase)
    re.compile(
        r"\b(?:user|asker)\s+(?:wants|is\s+asking\s+for|is\s+looking\s+for|is\s+referring\s+to)\s+"
        r"(?!" + _IMAGE_PHRASE + r")(?P<target>[^.;:\n]+)",
        re.IGNORECASE,
    ),
]
# A clause after the target's name: ", which is black", ", located in front of the piano".
_FOLLOWING_CLAUSE = re.compile(
    r",\s*(?=(?:which|that|who|whose|where|located|positioned|situated|placed|sitting|standing|lying|hanging|"
    r"found)\b)",
    re.IGNORECASE,
)
_LEADING_IMAGE_PHRASE = re.compile(r"^\s*" + _IMAGE_PHRASE, re.IGNORECASE)
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


def _find_target_phrase(text: str) -> tuple[str, int] | None:
    """The target named by the first matching prose pattern, cut at a following clause, and where it ends in text."""
    for pattern in _TARGET_PATTERNS:
        match = pattern.search(text)
        if not match:
            continue
        raw = match.group("target")
        clause = _FOLLOWING_CLAUSE.search(raw)
        if clause:
            raw = raw[: clause.start()]
        if _tidy_target(raw):
            return _tidy_target(raw), match.start("target") + len(raw)
    return None


def _sentence_end_after(text: str, position: int) -> int:
    """Index just past the sentence that contains ``position``."""
    match = _SENTENCE_END.search(text, position)
    return match.start() if match else len(text)


def _attributes_after(text: str, end: int) -> str:
    """A clause right after the target (", which is black ...") and what follows, else the sentences after it."""
    tail = _LEADING_IMAGE_PHRASE.sub("", text[end:], count=1)
    if _FOLLOWING_CLAUSE.match(tail):
        return _tidy(tail.lstrip(" ,"))
    return _tidy(text[_sentence_end_after(text, end):])


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
    target = phrase[0] if phrase else _tidy_target(_LEADING_FILLER.sub("", item_one.strip()))
    if not target:
        return None
    rest = _LEADING_ATTRIBUTES_LABEL.sub("", rest.strip())
    return ParsedAnswer(target, _tidy(rest), PARSE_OK)


def _parse_prose(text: str) -> ParsedAnswer | None:
    found = _find_target_phrase(text)
    if not found:
        return None
    target, end = found
    return ParsedAnswer(target, _attributes_after(text, end), PARSE_OK)


def _fallback(text: str) -> ParsedAnswer:
    flat = " ".join(text.split())
    sentences = _SENTENCE_END.split(flat, maxsplit=1)
    target = _LEADING_FILLER.sub("", sentences[0]) if sentences else ""
    attributes = sentences[1] if len(sentences) > 1 else ""
    return ParsedAnswer(_tidy_target(target), _tidy(attributes), PARSE_FALLBACK)


def parse_merged_answer(answer: str) -> ParsedAnswer:
    """Target and attributes of a step-2 or merged step-2/3 answer; see the module docstring for the shapes."""
    text = _clean(answer or "")
    if not text:
        return ParsedAnswer("", "", PARSE_FALLBACK)
    for parse in (_parse_labels, _parse_numbered, _parse_prose):
        parsed = parse(text)
        if parsed is not None:
            return parsed
    return _fallback(text)
