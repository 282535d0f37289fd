"""The report's tables as data (``{"header", "rows", "sub"}``, every cell a string), for the templates to lay out.

Numbers are formatted here once, so the Markdown and the HTML page show the same text: gIoU/cIoU in percent with one
decimal as in the paper, counts with thousands separators, "–" for what is missing.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from llavaseg.report.pictures import is_number

# Paper Table 1, ReasonSeg val: gIoU, cIoU (percent), ROUGE-L, CIDEr.
PAPER_TABLE_1 = [
    ("LLaVASeg-13B", 59.1, 52.8, 0.393, 0.796),
    ("LLaVASeg-7B", 54.8, 49.9, None, None),
    ("LISA-13B (explain)", 57.3, 60.7, 0.290, 0.107),
]
SCORE_KEYS = ("gIoU", "cIoU", "count", "failed")
STAGE1_COLUMNS = ("rows", "shards", "new_rows", "reused_rows", "errors", "capped_rows", "generated_tokens",
                  "embedded_tokens")
# Stage-1 summary keys shown as their own readable rows; any other scalar key is shown under its own name.
_STAGE1_READ = {"run_key", "new_rows", "reused_rows", "errors", "generated_samples", "seconds", "capped_rows",
                "max_embed_tokens", "engine_restarts", "retried_rows", "samples_per_s_in_generate_calls"}
BREAKDOWNS = (("query_kind", "query kind"), ("parse_status", "stage-1 parse status"), ("family", "dataset family"))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], sub: Sequence[bool] = ()) -> dict[str, Any]:
    return {"header": list(header), "rows": [[str(c) for c in r] for r in rows],
            "sub": [bool(s) for s in sub] + [False] * (len(rows) - len(sub))}  # fmt: skip


def percent(value: Any) -> str:
    return f"{100 * float(value):.1f}" if is_number(value) and math.isfinite(value) else "–"


def decimal(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if is_number(value) and math.isfinite(value) else "–"


def integer(value: Any) -> str:
    return f"{int(value):,}" if is_number(value) and math.isfinite(value) else "–"


def segmentation_rows(metrics: Mapping[str, Any]) -> list[tuple[str, int, dict]]:
    """(label, depth, scores) for every nested dict holding a numeric gIoU, cIoU or count, in input order.

    Grouping keys (``per_split``, ``by_query_kind`` and any other ``per_*``/``by_*``) are left out of the labels.
    """
    rows: list[tuple[str, int, dict]] = []

    def walk(node: Mapping[str, Any], labels: list[str]) -> None:
        for key, value in node.items():
            if not isinstance(value, Mapping):
                continue
            grouping = key.startswith(("per_", "by_"))
            path = labels if grouping else [*labels, str(key)]
            if not grouping and any(is_number(value.get(k)) for k in SCORE_KEYS):
                rows.append((" · ".join(path), len(path) - 1, value))
            walk(value, path)

    walk(metrics, [])
    return rows


def scalar_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in mapping.items()
            if isinstance(v, (str, int, float, bool)) and v is not None and k not in SCORE_KEYS]  # fmt: skip


def segmentation_table(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    rows = segmentation_rows(metrics)
    if not rows:
        return None
    return table(["split", "gIoU (%)", "cIoU (%)", "samples", "failed (scored empty)"],
                 [[label, percent(s.get("gIoU")), percent(s.get("cIoU")), integer(s.get("count")),
                   integer(s.get("failed"))] for label, _, s in rows], [depth > 0 for _, depth, _ in rows])  # fmt: skip


def paper_table() -> dict[str, Any]:
    return table(["method", "gIoU (%)", "cIoU (%)", "ROUGE-L", "CIDEr"],
                 [[m, f"{g:.1f}", f"{c:.1f}", decimal(r), decimal(d)] for m, g, c, r, d in PAPER_TABLE_1])


def scored(samples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [s for s in samples if is_number(s.get("iou")) and math.isfinite(s["iou"])]


def breakdown_tables(samples: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(title, table) of gIoU/cIoU per query kind, per stage-1 parse status and per dataset family, each over the
    scored samples that carry that field; cIoU needs the samples' ``intersection`` and ``union``."""
    out = []
    samples = scored(samples)
    for key, title in BREAKDOWNS:
        groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for sample in samples:
            value = sample.get(key)
            if key == "parse_status" and sample.get("stage1_status") == "error":
                value = "stage-1 error"
            if value not in (None, ""):
                groups[str(value)].append(sample)
        if not groups:
            continue
        rows = []
        for name in sorted(groups):
            members = groups[name]
            union = sum(float(m.get("union") or 0) for m in members)
            has_counts = all(is_number(m.get("union")) for m in members)
            ciou = sum(float(m.get("intersection") or 0) for m in members) / union if has_counts and union else None
            failed = sum(1 for m in members if m.get("status") not in (None, "ok"))
            rows.append([name, percent(sum(float(m["iou"]) for m in members) / len(members)), percent(ciou),
                         integer(len(members)), integer(failed)])  # fmt: skip
        out.append((f"By {title}", table([title, "gIoU (%)", "cIoU (%)", "samples", "failed (scored empty)"], rows)))
    return out


def _value(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    return integer(value) if isinstance(value, int) else decimal(value, 2)


def stage1_table(stage1: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The stage-1 summary as labelled rows, and notes to print under it."""
    rows, notes = [], []
    get = stage1.get
    if get("run_key"):
        rows.append(["run key", str(get("run_key"))])
    new, reused = get("new_rows"), get("reused_rows")
    total = sum(v for v in (new, reused) if is_number(v))
    if is_number(new) or is_number(reused):
        rows.append(["samples", f"{integer(total)} ({integer(new)} reasoned by this run, {integer(reused)} reused "
                                f"from earlier runs)"])  # fmt: skip
    if is_number(get("errors")):
        share = f" ({100 * get('errors') / total:.1f}%)" if total else ""
        rows.append(["stage-1 errors", f"{integer(get('errors'))}{share}"])
    seconds, generated = get("seconds"), get("generated_samples")
    if is_number(seconds):
        rows.append(["wall time of this run", f"{float(seconds):.1f} s"])
    if is_number(seconds) and is_number(generated) and seconds > 0 and generated > 0:
        rows.append(["generation throughput", f"{generated / seconds:.2f} samples/s"])  # this call, wall clock
    if is_number(get("samples_per_s_in_generate_calls")):
        rows.append(["throughput inside generate calls", f"{get('samples_per_s_in_generate_calls'):.2f} samples/s"])
    for key, label in (("engine_restarts", "engine restarts"), ("retried_rows", "rows retried")):
        if is_number(get(key)):
            rows.append([label, integer(get(key))])
    capped, cap = get("capped_rows"), get("max_embed_tokens")
    if is_number(capped):
        share = f" ({100 * capped / total:.1f}%)" if total else ""
        rows.append(["rows cut at max_embed_tokens", f"{integer(capped)} of {integer(total)}{share}"
                     + (f", cap {integer(cap)} tokens" if is_number(cap) else "")])  # fmt: skip
        if capped > 0:
            notes.append(f"{integer(capped)} rows had a seg_text longer than stage1.max_embed_tokens; only its first "
                         "tokens were embedded, so trailing attributes were cut (shards: seg_tokens).")
    rows += [[k.replace("_", " "), _value(v)] for k, v in scalar_items(stage1) if k not in _STAGE1_READ]
    return table(["", "value"], rows), notes


def stage1_manifest_table(stage1: Mapping[str, Any]) -> dict[str, Any] | None:
    per_manifest = stage1.get("per_manifest") or {}
    if not per_manifest:
        return None
    keys = [k for k in STAGE1_COLUMNS if any(k in s for s in per_manifest.values())]
    keys += sorted({k for s in per_manifest.values() for k in s if k not in keys and is_number(s[k])})
    header = ["manifest", *(k.replace("_", " ").replace(" seconds", " (s)") for k in keys)]
    return table(header, [[name, *(_value(s.get(k)) if s.get(k) is not None else "–" for k in keys)]
                          for name, s in per_manifest.items()])  # fmt: skip


def stage1_error_tables(errors: Sequence[Mapping[str, Any]], shown: int) -> tuple[dict | None, dict | None]:
    """(messages with their counts, the first ``shown`` errors by sample) of the stage-1 error rows."""
    if not errors:
        return None, None
    counts = Counter(str(e.get("error") or "(no message)") for e in errors)
    by_message = table(["message", "rows"], [[m, integer(n)] for m, n in counts.most_common()])
    listed = table(["sample", "error"], [[str(e.get("sample_id")), str(e.get("error") or "(no message)")]
                                         for e in errors[:shown]])  # fmt: skip
    return by_message, listed
