"""Quality of the mini LLaVA on demo-world scenes it never saw: the bars of the trained-mini-models work.

For each scene (the val split of ``data.demo_seed`` 0, and the val split of a fresh seed the tests never use), its
first query goes through the chain of thought with vLLM (float32, greedy), for every prompt version the model was
trained on: step 1 (``reason_messages``), the merged steps 2+3 (``target_attribute_messages``) and step 2 alone
(``target_messages``), each second turn after the model's own step-1 answer. Figures per set and prompt version:

- ``parse_ok``: ``parse_merged_answer(merged).parse_status == "ok"`` (bar >= 0.95);
- ``target_right``: the parsed target names exactly the target's colour and shape (bar >= 0.90); ``step2_target_right``
  the same for the step-2-only answer;
- ``twin_singled_out``: in scenes where two objects share the target's name, the parsed attributes state at least one
  relation that is false of the twin and none that is false of the target (``demo_text.singles_out``; bar >= 0.80);
- ``twin_sentence_singled_out`` (a diagnostic, no bar): the same test on the attributes' "... of the two ..." sentence
  alone, without the region and neighbour sentences around it;
- ``step1_rouge_l``: ROUGE-L of the step-1 answer against the scene's explanatory reference (bar >= 0.5).

    .venv/bin/python bench/mini_llava_quality.py --scenes 120 --fresh-seed 9001 --out bench/results/mini_llava.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

logger = logging.getLogger("bench.mini_llava_quality")

COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPE_WORDS = ("circle", "square", "triangle", "star", "diamond", "hexagon")


def names_exactly(text: str, colour: str, shape: str) -> bool:
    """The text names ``colour`` and ``shape`` and no other colour or shape of the world (plurals count)."""
    words = {w[:-1] if w.endswith("s") and w[:-1] in SHAPE_WORDS else w for w in re.findall(r"[a-z]+", text.lower())}
    return {c for c in COLOUR_WORDS if c in words} == {colour} and {s for s in SHAPE_WORDS if s in words} == {shape}


def scene_samples(seed: int, count: int) -> list:
    from manifests.demo import render_scene

    return [render_scene("val", index, seed) for index in range(count)]


def evaluate(backend, samples: list, prompt_version: str) -> tuple[dict, list[dict]]:
    """The figures for one set and prompt version, and one record per scene."""
    from llavaseg.dialogue import dialogue_scores
    from manifests.demo_text import singles_out
    from stage1_reason import prompts
    from stage1_reason.engine import Request
    from stage1_reason.parsing import PARSE_OK, parse_merged_answer

    questions = [
        prompts.reason_question(s.annotation["text"][0], "sentence" if s.annotation["is_sentence"] else "phrase",
                                prompt_version) for s in samples
    ]  # fmt: skip
    step1 = backend.generate(
        [Request(str(i), prompts.reason_messages(q), s.image) for i, (q, s) in enumerate(zip(questions, samples))]
    )
    merged = backend.generate([
        Request(str(i), prompts.target_attribute_messages(q, r.text, prompt_version), s.image)
        for i, (q, r, s) in enumerate(zip(questions, step1, samples))
    ])  # fmt: skip
    step2 = backend.generate([
        Request(str(i), prompts.target_messages(q, r.text, prompt_version), s.image)
        for i, (q, r, s) in enumerate(zip(questions, step1, samples))
    ])  # fmt: skip
    records = []
    for i, sample in enumerate(samples):
        scene = sample.scene
        parsed = parse_merged_answer(merged[i].text)
        parsed2 = parse_merged_answer(step2[i].text)
        record = {
            "index": i, "kind": scene.kind, "twin_kind": scene.twin_kind, "query": sample.annotation["text"][0],
            "target": scene.target.name, "step1": step1[i].text, "merged": merged[i].text, "step2": step2[i].text,
            "reference": sample.explanations[0]["outputs"], "parse_ok": parsed.parse_status == PARSE_OK,
            "parsed_target": parsed.target, "attributes": parsed.attributes,
            "target_right": names_exactly(parsed.target, scene.target.colour, scene.target.shape),
            "step2_target_right": names_exactly(parsed2.target, scene.target.colour, scene.target.shape),
            "errors": [r.error for r in (step1[i], merged[i], step2[i]) if r.error],
        }  # fmt: skip
        if scene.kind == "twin":
            record["twin_singled_out"] = singles_out(scene, parsed.attributes)
            twin_sentences = [t for t in re.split(r"(?<=\.)\s+", parsed.attributes or "") if "of the two" in t]
            record["twin_sentence_singled_out"] = bool(twin_sentences) and singles_out(scene, twin_sentences[0])
        records.append(record)
    rouge = dialogue_scores({str(i): r.text for i, r in enumerate(step1)},
                            {str(i): s.explanations[0]["outputs"] for i, s in enumerate(samples)})  # fmt: skip
    twins = [r for r in records if r["kind"] == "twin"]

    def mean(rows: list[dict], key: str) -> float:
        return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else float("nan")

    figures = {
        "scenes": len(records),
        "twin_scenes": len(twins),
        "parse_ok": mean(records, "parse_ok"),
        "target_right": mean(records, "target_right"),
        "step2_target_right": mean(records, "step2_target_right"),
        "twin_singled_out": mean(twins, "twin_singled_out"),
        "twin_sentence_singled_out": mean(twins, "twin_sentence_singled_out"),
        "step1_rouge_l": round(rouge["ROUGE-L"], 4),
        "step1_cider": round(rouge["CIDEr"], 4),
        "target_right_by_kind": {
            kind: mean([r for r in records if r["kind"] == kind], "target_right")
            for kind in sorted(collections.Counter(r["kind"] for r in records))
        },
        "twin_singled_out_by_twin_kind": {
            kind: mean([r for r in twins if r["twin_kind"] == kind], "twin_singled_out")
            for kind in sorted(collections.Counter(r["twin_kind"] for r in twins))
        },
        "errors": sum(bool(r["errors"]) for r in records),
    }
    return figures, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-llava", help="mini-llava (the committed weights) or a model folder")
    parser.add_argument("--scenes", type=int, default=120, help="scenes per set")
    parser.add_argument("--fresh-seed", type=int, default=9001, help="demo seed of the fresh held-out scenes")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=None, help="JSON with the figures and every record")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from stage1_reason import prompts
    from stage1_reason.engine import VllmBackend
    from stage1_reason.tiny_model import resolve_model

    model = resolve_model(args.model, Path("work"))
    summary_file = Path(model) / "mini_llava.json"
    versions = json.loads(summary_file.read_text())["prompt_versions"] if summary_file.is_file() else ["v1"]
    versions = [v for v in versions if v in prompts.PROMPTS]
    sets = {"val (demo_seed 0)": scene_samples(0, args.scenes),
            f"fresh (demo_seed {args.fresh_seed})": scene_samples(args.fresh_seed, args.scenes)}  # fmt: skip
    started = time.perf_counter()
    backend = VllmBackend(model, max_new_tokens=args.max_new_tokens, dtype="float32", max_model_len=2048,
                          gpu_memory_utilization=0.1, enforce_eager=True, seed=0)  # fmt: skip
    results, records = {}, {}
    try:
        for name, samples in sets.items():
            for version in versions:
                key = f"{name}, prompts {version}"
                results[key], records[key] = evaluate(backend, samples, version)
                logger.info("%s: %s", key, json.dumps({k: v for k, v in results[key].items() if "by" not in k}))
    finally:
        backend.close()
    output = {"model": model, "seconds": round(time.perf_counter() - started, 1), "results": results}
    print(json.dumps(output, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**output, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
