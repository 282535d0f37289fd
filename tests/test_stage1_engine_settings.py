"""Engine settings that cut stage 1's engine lifecycle: the KV cache in tokens, the prompt count without the pixels,
the embedding backend, and the per-phase engine accounting (no engine started here; the in-process engines run in
``test_stage1_run``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shared.config import ConfigError, load_config
from stage1_reason import prompts

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TOML = REPO / "pipeline.toml"


def test_kv_cache_bytes_from_the_decoder_shape(tiny_llava_dir, mini_llava_dir):
    from stage1_reason.backends import kv_cache_bytes

    # K and V x layers x KV heads x head_dim x bytes per value x tokens
    assert kv_cache_bytes(str(tiny_llava_dir), 1000, "float32") == 2 * 2 * 2 * 64 * 4 * 1000  # 2 layers, 2 heads
    assert kv_cache_bytes(str(mini_llava_dir), 32768, "float32") == 2 * 4 * 4 * 64 * 4 * 32768 == 256 * 2**20
    assert kv_cache_bytes(str(mini_llava_dir), 32768, "bfloat16") == 128 * 2**20


def test_engine_kwargs_pass_the_kv_cache_only_when_given_in_tokens(mini_llava_dir):
    from stage1_reason.backends import engine_kwargs

    config = load_config(PIPELINE_TOML)
    assert engine_kwargs(config, str(mini_llava_dir)) == {"kv_cache_memory_bytes": 256 * 2**20}
    unset = load_config(PIPELINE_TOML, overrides=["stage1.kv_cache_tokens=0"])
    assert engine_kwargs(unset, str(mini_llava_dir)) == {}


def test_engine_process_mode_sets_and_restores_the_vllm_switch(monkeypatch):
    import os

    from stage1_reason.backends import engine_process_mode

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with engine_process_mode(True):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with engine_process_mode(True):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    with engine_process_mode(False):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


@pytest.mark.parametrize("conversation_format", ["chat_template", "llava_v1"])
def test_prompt_count_without_the_pixels_equals_the_processors(tiny_llava_dir, mini_llava_dir, conversation_format):
    """The vLLM backends count prompt tokens from the text and the image's size; the processor agrees on every
    model, conversation format and image shape (wide, tall, tiny, padded to a square)."""
    from stage1_reason.engine import load_processor, mllm_image
    from stage1_reason.llava_conventions import clip_mean_colour, count_prompt_tokens

    question = "Which object here could roll off a table?"
    turn_one = prompts.reason_messages(question)
    messages = prompts.target_attribute_messages(question, "It is the red circle: circles roll.") \
        if conversation_format == "llava_v1" else turn_one  # the second turn too: the image stays in the first
    for model in (tiny_llava_dir, mini_llava_dir):
        processor = load_processor(str(model))
        prompt = prompts.render_prompt(processor, messages, conversation_format)
        for size in ((128, 128), (640, 200), (37, 500), (3, 3)):
            for pad in (None, clip_mean_colour(processor)):
                image = mllm_image(Image.new("RGB", size, (200, 30, 30)), pad)
                full = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
                assert count_prompt_tokens(processor, prompt, image) == int(full), (model.name, size, pad)


def test_new_engine_keys_are_checked_by_name():
    with pytest.raises(ConfigError) as err:
        load_config(PIPELINE_TOML, overrides=["stage1.kv_cache_tokens=-5", "stage1.embed_backend=onnx"])
    problems = "\n".join(err.value.problems)
    assert "stage1.kv_cache_tokens: must be >= 0" in problems
    assert "stage1.embed_backend" in problems and "onnx" in problems


def test_embed_backend_chooses_the_embedder(tiny_llava_dir, tmp_path):
    """``embed_backend = "transformers"`` with the vLLM generation backend: no pooling engine to start; with the
    openai backend it needs no pooling server."""
    from stage1_reason.backends import make_embedder_for
    from stage1_reason.embed import TransformersEmbedder

    config = load_config(PIPELINE_TOML, overrides=["stage1.embed_backend=transformers", "stage1.max_embed_tokens=16"])
    embedder = make_embedder_for(config, str(tiny_llava_dir))
    try:
        assert isinstance(embedder, TransformersEmbedder) and embedder.max_embed_tokens == 16
    finally:
        embedder.close()
    served = load_config(PIPELINE_TOML, overrides=[
        "stage1.backend=openai", "stage1.server_url=http://127.0.0.1:9", "stage1.embed_backend=transformers"])
    assert served.stage1.embed_server_url == ""  # accepted: the local embedder computes the embeddings
    with pytest.raises(ConfigError, match="stage1.embed_server_url: required"):
        load_config(PIPELINE_TOML, overrides=["stage1.backend=openai", "stage1.server_url=http://127.0.0.1:9"])


class _Engine:
    """A stand-in engine for the executor's bookkeeping (the executor only calls ``close``)."""

    closed = 0

    def close(self) -> None:
        type(self).closed += 1


def test_a_phase_starts_one_engine_for_all_its_shards_and_counts_its_lifecycle():
    from stage1_reason.engine_health import EngineFailure
    from stage1_reason.executor import EngineLifecycle, run_with_restarts

    tasks = [type("Task", (), {"path": f"shard-{i}"})() for i in range(5)]
    lifecycle = EngineLifecycle()
    results, restarts = run_with_restarts(tasks, "test", None, _Engine, lambda task, engine: task.path, 2, lifecycle)
    assert results == [t.path for t in tasks] and restarts == 0
    assert lifecycle.starts == 1 and _Engine.closed == 1 and lifecycle.seconds >= 0
    failures = iter([True, False, False, False, False, False])

    def flaky(task, engine):
        if next(failures):
            raise EngineFailure("engine process(es) [1] died")
        return task.path

    again = EngineLifecycle()
    results, restarts = run_with_restarts(tasks, "test", None, _Engine, flaky, 2, again)
    assert len(results) == 5 and restarts == 1 and again.starts == 2  # one restart: two engines in this phase
    passed_in = EngineLifecycle()
    run_with_restarts(tasks, "test", _Engine(), _Engine, lambda task, engine: 0, 2, passed_in)
    assert passed_in.starts == 0  # the caller's engine is not ours to count or close
    assert passed_in.as_dict() == {"starts": 0, "start_s": 0.0, "close_s": 0.0}


def test_a_restart_that_dies_while_it_starts_uses_up_another_restart():
    from stage1_reason.engine_health import EngineFailure
    from stage1_reason.executor import EngineLifecycle, run_with_restarts

    tasks = [type("Task", (), {"path": f"shard-{i}"})() for i in range(3)]
    failures = iter([True] + [False] * 10)

    def flaky(task, engine):
        if next(failures):
            raise EngineFailure("engine process(es) [1] died")
        return task.path

    def starts(dies: set[int]):
        count = iter(range(100))

        def make():
            if next(count) in dies:
                raise RuntimeError("Engine core initialization failed")
            return _Engine()
        return make

    lifecycle = EngineLifecycle()
    results, restarts = run_with_restarts(tasks, "test", None, starts({1}), flaky, 2, lifecycle)
    assert results == [t.path for t in tasks] and restarts == 2  # the died start counted as a restart
    assert lifecycle.starts == 2  # the first engine and the one that came up
    failures = iter([True] + [False] * 10)
    with pytest.raises(EngineFailure, match=r"restarted engine failed to start: Engine core initialization failed; "
                                            r"stopped after 2 engine restart\(s\).*shard-0 is not done"):  # fmt: skip
        run_with_restarts(tasks, "test", None, starts({1, 2}), flaky, 2, EngineLifecycle())
