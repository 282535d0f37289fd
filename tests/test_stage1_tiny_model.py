"""The locally built tiny LLaVA: deterministic, cached, in the hub layout, and resolvable by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from stage1_reason.engine import load_processor
from stage1_reason.tiny_model import COMPLETE_MARKER, build_tiny_llava, resolve_model


def _weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_hub_layout_and_sizes(tiny_llava_dir: Path) -> None:
    with safe_open(str(tiny_llava_dir / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        embed_shape = tuple(handle.get_slice("language_model.model.embed_tokens.weight").get_shape())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.lm_head.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    assert not any(key.startswith(("model.", "vision_tower.embeddings")) for key in keys)
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    text = config["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_hidden_layers"]) == (128, 2, 2)
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == (112, 14)
    assert embed_shape == (text["vocab_size"], 128)


def test_tokenizer_knows_the_demo_words_and_the_image_token(tiny_llava_dir: Path) -> None:
    tokenizer = load_processor(str(tiny_llava_dir)).tokenizer
    ids = tokenizer("the red circle <image>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["the", "Ġred", "Ġcircle", "Ġ", "<image>"]
    for word in ("target", "attributes", "triangle", "yellow", "guidelines"):
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_same_seed_same_model_other_seed_other_weights(tmp_path: Path, tiny_llava_dir: Path) -> None:
    again = build_tiny_llava(tmp_path / "again", seed=0)
    other = build_tiny_llava(tmp_path / "other", seed=1)
    assert _weights_digest(again) == _weights_digest(tiny_llava_dir)
    assert (again / "tokenizer.json").read_bytes() == (tiny_llava_dir / "tokenizer.json").read_bytes()
    assert _weights_digest(other) != _weights_digest(tiny_llava_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no staging folders left behind


def test_complete_copy_is_reused_and_incomplete_one_rebuilt(tmp_path: Path) -> None:
    folder = build_tiny_llava(tmp_path / "m")
    marker_time = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    assert build_tiny_llava(folder) == folder
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == marker_time
    (folder / COMPLETE_MARKER).unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    build_tiny_llava(folder)
    assert (folder / COMPLETE_MARKER).is_file()
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "language_model.lm_head.weight" in set(handle.keys())


def test_resolve_model(tmp_path: Path, work_dir: Path, tiny_llava_dir: Path) -> None:
    assert resolve_model("tiny-llava", work_dir) == str(tiny_llava_dir)
    assert resolve_model(str(tiny_llava_dir), tmp_path) == str(tiny_llava_dir.resolve())
    assert resolve_model("llava-hf/llava-1.5-7b-hf", tmp_path) == "llava-hf/llava-1.5-7b-hf"
    for missing in (str(tmp_path / "nope"), "./models/nope", "models/llava/nope"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            resolve_model(missing, tmp_path)
