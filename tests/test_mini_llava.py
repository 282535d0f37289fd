"""The trained mini LLaVA: committed files match their hashes, the training's first steps lower the loss, the
conversations put the loss on the assistant's tokens only, and the committed model answers in the trained shapes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from stage1_reason import prompts
from stage1_reason.tiny_model import MINI_MODELS, resolve_model

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MAX_BYTES = 25 * 1024 * 1024


def _sums() -> dict[str, str]:
    """The ``mini-llava/`` lines of weights/SHA256SUMS (``sha256sum`` format): path -> sha256."""
    rows = [line.split(maxsplit=1) for line in (WEIGHTS / "SHA256SUMS").read_text().splitlines() if line.strip()]
    return {path.strip(): digest for digest, path in rows if path.strip().startswith("mini-llava/")}


def test_committed_files_match_their_hashes():
    sums = _sums()
    on_disk = sorted(p.relative_to(WEIGHTS).as_posix() for p in (WEIGHTS / "mini-llava").rglob("*") if p.is_file())
    assert sorted(sums) == on_disk and "mini-llava/model.safetensors" in sums
    for name, digest in sums.items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    assert sum((WEIGHTS / name).stat().st_size for name in sums) <= MAX_BYTES


def test_resolve_model_returns_the_committed_folder(tmp_path):
    assert resolve_model("mini-llava", tmp_path) == str(MINI_MODELS["mini-llava"])
    assert not (tmp_path / "models").exists()  # nothing is built


def test_the_committed_model_keeps_the_llava_layout():
    config = json.loads((WEIGHTS / "mini-llava" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64 and text["model_type"] == "llama"
    assert vision["model_type"] == "clip_vision_model" and config["vision_feature_layer"] == -2
    summary = json.loads((WEIGHTS / "mini-llava" / "mini_llava.json").read_text())
    assert summary["losses"][-1]["loss"] < 0.5 * summary["losses"][0]["loss"]
    assert summary["val_loss"] < summary["val_loss_before"]


def test_loss_is_on_assistant_tokens_only():
    from manifests.demo import render_scene
    from manifests.demo_text import queries
    from stage1_reason.mini_llava_data import IGNORE, conversation, encode
    from stage1_reason.mini_llava_model import NUM_IMAGE_TOKENS, make_processor, tokenizer_corpus, train_tokenizer

    processor = make_processor(train_tokenizer(tokenizer_corpus(scenes=40)))
    sample = render_scene("train", 3, 0)
    query, explanation = queries(sample.scene, True)[0]
    convo = conversation(sample, query, explanation, "merged", "v1")
    input_ids, labels = encode(processor, convo)
    assert input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == NUM_IMAGE_TOKENS
    learned = processor.tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE])
    step1 = convo.messages[1]["content"][0]["text"]
    assert learned == f" {step1} {convo.answer}</s>"
    prompt = prompts.render_prompt(processor, convo.messages)
    prompt_ids = processor(text=[prompt], images=[sample.image], return_tensors="pt")["input_ids"][0].tolist()
    answer_ids = processor.tokenizer(" " + convo.answer, add_special_tokens=False)["input_ids"]
    assert input_ids == prompt_ids + answer_ids + [processor.tokenizer.eos_token_id]  # as the engines tokenise


def test_first_training_steps_lower_the_loss(tmp_path):
    from stage1_reason.mini_llava import build_mini_llava

    summary = build_mini_llava(tmp_path / "mini", steps=8, batch_size=2, progress=False)
    losses = [entry["loss"] for entry in summary["losses"]]
    total = summary["ground_steps"] + 8  # the grounding phase (scaled down with the steps), then the task mix
    assert summary["ground_steps"] == 3 and summary["ground_batch"] == 8
    assert len(losses) == total and [entry["step"] for entry in summary["losses"]] == list(range(1, total + 1))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert summary["val_loss"] < summary["val_loss_before"] - 0.3
    assert (tmp_path / "mini" / "model.safetensors").is_file() and (tmp_path / "mini" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def val_samples():
    from manifests.demo import render_scene

    return [render_scene("val", index, 0) for index in range(6)]


def _requests(samples, answers=None, version="v1"):
    from stage1_reason.engine import Request

    out = []
    for i, sample in enumerate(samples):
        kind = "sentence" if sample.annotation["is_sentence"] else "phrase"
        question = prompts.reason_question(sample.annotation["text"][0], kind, version)
        messages = prompts.reason_messages(question) if answers is None else prompts.target_attribute_messages(
            question, answers[i], version)  # fmt: skip
        out.append(Request(str(i), messages, sample.image))
    return out


def test_vllm_and_transformers_write_identical_greedy_text(vllm_mini_engine, mini_llava_dir, val_samples):
    from conftest import MINI_MAX_NEW_TOKENS, TINY_ENGINE_SETTINGS
    from stage1_reason.engine import TransformersBackend

    reference = TransformersBackend(str(mini_llava_dir), max_new_tokens=MINI_MAX_NEW_TOKENS,
                                    dtype=TINY_ENGINE_SETTINGS["dtype"])  # fmt: skip
    step1_vllm = vllm_mini_engine.generate(_requests(val_samples))
    step1_hf = reference.generate(_requests(val_samples))
    assert [r.text for r in step1_vllm] == [r.text for r in step1_hf]
    assert all(r.ok and r.text.startswith("It is the ") for r in step1_vllm)
    answers = [r.text for r in step1_vllm]
    merged_vllm = vllm_mini_engine.generate(_requests(val_samples, answers))
    merged_hf = reference.generate(_requests(val_samples, answers))
    assert [r.text for r in merged_vllm] == [r.text for r in merged_hf]
    assert all(r.text.startswith("The target entity in the image is the ") for r in merged_vllm)
    reference.close()
