"""``llavaseg ablate``: the paper's Table 3 ablations that configuration supports, as one table.

Variants, each a set of config overrides on top of the given config (the baseline):

- (a) prompts: ``stage1.cot_steps`` 1 (step-1 answer), 2 (the step-2 target prompt alone; its target is embedded), 3 (the
  merged step-2/3 answer, as written: the baseline);
- (p) prompt wording, on request (``--prompt-versions v1 v2``): the baseline's CoT steps with each ``stage1.prompt_version``
  (v1: Figure 4's merged wording; v2: Sec. 3.2 word for word);
- (b) scales: adapters after one encoder block (the deepest of the baseline's adapter blocks) vs the baseline's
  multi-scale blocks;
- (d) generalisation: training without the ReasonSeg manifests ("nors"), evaluated on the same eval manifests.

Every variant goes through the same steps as ``llavaseg run`` (stage 1, training, evaluation) and reuses whatever is
finished: stage-1 shards are shared by every variant with the same stage-1 settings (all but (a) share the baseline's),
checkpoints and evaluations by variants that resolve to the same training run. Variants that cannot run on the given
data (e.g. "nors" when ReasonSeg is all the training data) are listed as skipped with the reason. Output:
``<work_dir>/ablation/ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import PipelineConfig, load_config
from shared.console import echo
from shared.shards import write_json_atomic

log = logging.getLogger(__name__)

REASONSEG = "reasonseg"


@dataclass
class Variant:
    table: str  # "a", "b", "d" as in the paper's Table 3; "p" for the prompt wording
    label: str
    overrides: list[str]
    skipped: str = ""  # reason, when the variant cannot run on this data
    result: dict[str, Any] = field(default_factory=dict)


def _list_value(items: list[Any]) -> str:
    return json.dumps(items)  # a TOML array literal for the override parser


def plan_variants(config: PipelineConfig, prompt_versions: list[str] | tuple[str, ...] = ()) -> list[Variant]:
    """The ablation variants of ``config`` (the baseline is the multi-scale, 3-step row); ``prompt_versions`` adds a
    row per prompt version (table "p"), the baseline's own version included."""
    from stage2_segment.modeling import get_variant

    baseline_steps = config.stage1.cot_steps
    variants = [
        Variant("a", label, [f"stage1.cot_steps={steps}"])
        for steps, label in ((1, "step 1"), (2, "steps 1+2"), (3, "steps 1+2+3"))
    ]
    blocks = list(config.stage2.adapter_blocks) or list(get_variant(config.stage2.sam_variant).encoder_global_attn_indexes)
    cot = f"stage1.cot_steps={baseline_steps}"
    if len(blocks) > 1:
        variants.append(Variant("b", f"single-scale (block {blocks[-1]})", [cot, f"stage2.adapter_blocks={_list_value(blocks[-1:])}"]))
    else:
        variants.append(Variant("b", "single-scale", [], skipped="the configured adapters are already one block"))
    variants.append(Variant("b", f"multi-scale (blocks {', '.join(map(str, blocks))})", [cot]))
    without = [spec for spec in config.data.train if spec.split("/")[0] != REASONSEG]
    if not any(spec.split("/")[0] == REASONSEG for spec in config.data.train):
        variants.append(Variant("d", "without ReasonSeg (nors)", [], skipped="the training data has no ReasonSeg manifest"))
    elif not without:
        variants.append(Variant("d", "without ReasonSeg (nors)", [],
                                skipped="ReasonSeg is all of the training data: nothing left to train on"))  # fmt: skip
    else:
        variants.append(Variant("d", "without ReasonSeg (nors)", [cot, f"data.train={_list_value(without)}"]))
    variants.append(Variant("d", "with ReasonSeg", [cot]))
    for version in dict.fromkeys(prompt_versions):
        baseline = " (baseline)" if version == config.stage1.prompt_version else ""
        variants.append(Variant("p", f"prompt_version {version}{baseline}", [cot, f"stage1.prompt_version={version}"]))
    return variants


def _scores_cells(result: dict[str, Any], specs: list[str]) -> list[str]:
    cells = []
    for spec in specs:
        scores = (result.get("results") or {}).get(spec)
        cells += [f"{100 * scores['gIoU']:.1f}", f"{100 * scores['cIoU']:.1f}"] if scores else ["–", "–"]
    return cells


def ablation_markdown(variants: list[Variant], specs: list[str], notes: list[str]) -> str:
    titles = {"a": "(a) Chain-of-thought steps", "b": "(b) Scales of the language-aware adapters",
              "d": "(d) Training with or without ReasonSeg", "p": "Prompt wording (stage1.prompt_version)"}  # fmt: skip
    lines = ["# Ablations (paper Table 3)", ""]
    for note in notes:
        lines += [f"> **Note:** {note}", ""]
    header = ["variant", *(f"{spec} {m} (%)" for spec in specs for m in ("gIoU", "cIoU")), "train run", "stage-1 run"]
    for table in ("a", "b", "d", "p"):
        if not any(v.table == table for v in variants):
            continue
        lines += [f"## {titles[table]}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join([":--", *["--:"] * (2 * len(specs)), ":--", ":--"]) + "|"]  # fmt: skip
        for v in (v for v in variants if v.table == table):
            if v.skipped:
                cells = [v.label, *(["–"] * 2 * len(specs)), f"skipped: {v.skipped}", ""]
            else:
                cells = [v.label, *_scores_cells(v.result, specs), v.result.get("train_name", ""),
                         v.result.get("stage1_run_key", "")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_ablation(
    config_path: str | Path, profile: str | None, overrides: list[str], backend: Any = None, embedder: Any = None,
    prompt_versions: list[str] | tuple[str, ...] = (),
) -> tuple[Path, list[Variant]]:
    """Run every variant of the config at ``config_path`` (+ profile, overrides); returns the table path and variants.
    ``backend``/``embedder``: stage-1 engines already running (they serve every variant; only prompts differ).
    ``prompt_versions``: also compare these stage-1 prompt versions (table "p")."""
    from llavaseg.pipeline import evaluate_or_reuse, prepare, reason, report_notes, stage2_sources
    from stage2_segment.train import train

    base = load_config(config_path, profile, overrides)
    variants = plan_variants(base, prompt_versions)
    manifests = prepare(base)
    notes = report_notes(base)
    for note in notes:
        echo(f"note: {note}")
    done: dict[str, dict[str, Any]] = {}  # train name -> result, shared by variants that resolve to the same run
    runnable = [v for v in variants if not v.skipped]
    for number, variant in enumerate(runnable, 1):
        started = time.perf_counter()
        echo(f"ablation {number}/{len(runnable)}: ({variant.table}) {variant.label}  [{' '.join(variant.overrides)}]")
        config = load_config(config_path, profile, [*overrides, *variant.overrides])
        stage1 = reason(config, manifests, backend=backend, embedder=embedder)
        train_sources = stage2_sources(config, manifests, config.data.train)
        trained = train(config, train_sources)
        if trained.train_name in done:
            variant.result = done[trained.train_name]
        else:
            metrics, _ = evaluate_or_reuse(config, stage2_sources(config, manifests, config.data.eval),
                                           Path(trained.checkpoint_dir))  # fmt: skip
            variant.result = {"results": metrics["results"], "train_name": trained.train_name,
                              "step": trained.final_step, "stage1_run_key": stage1.run_key,
                              "checkpoint": str(trained.checkpoint_dir)}  # fmt: skip
            done[trained.train_name] = variant.result
        echo(f"  stage 1: {stage1.new_rows} new, {stage1.reused_rows} reused; {trained.train_name} step "
             f"{trained.final_step} ({trained.steps_done} new steps); {time.perf_counter() - started:.0f}s")
    out_dir = base.work_dir / "ablation"
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = list(base.data.eval)
    md_path = out_dir / "ablation.md"
    md_path.write_text(ablation_markdown(variants, specs, notes), encoding="utf-8")
    write_json_atomic(out_dir / "ablation.json", {
        "notes": notes,
        "variants": [{"table": v.table, "label": v.label, "overrides": v.overrides, "skipped": v.skipped, **v.result}
                     for v in variants],
    })  # fmt: skip
    return md_path, variants
