"""``stage1.backend = "openai"`` settings: refused at config load, each naming its key; the key comes from the env."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load_config
from stage1_reason.openai_backend import api_key_from_env, base_url, chat_messages, verbatim_template


def test_openai_settings_are_checked_all_at_once():
    overrides = ["stage1.backend=openai", "stage1.api_key_env=sk-123", "stage1.max_concurrency=0",
                 "stage1.request_retries=-1", "stage1.request_timeout_s=0", "stage1.embed_server_url=localhost:8001"]
    with pytest.raises(ConfigError) as error:
        load_config("pipeline.toml", None, overrides, check_paths=False)
    assert error.value.problems == [
        "stage1.embed_server_url: 'localhost:8001' is not an http(s)://host:port URL",
        "stage1.server_url: required with stage1.backend = 'openai' (the `vllm serve` URL)",
        "stage1.api_key_env: 'sk-123' is not an environment variable name (the key itself does not belong in the "
        "config)",
        "stage1.max_concurrency: must be >= 1, got 0",
        "stage1.request_retries: must be >= 0, got -1",
        "stage1.request_timeout_s: must be a finite number > 0, got 0.0",
    ]


def test_input_mode_needs_no_embedding_server():
    config = load_config("pipeline.toml", None, ["stage1.backend=openai", "stage1.server_url=http://127.0.0.1:8000",
                                                 "stage1.embed_mode=input"], check_paths=False)  # fmt: skip
    assert (config.stage1.backend, config.stage1.embed_server_url, config.stage1.max_concurrency) == ("openai", "", 8)


def test_api_key_from_env(monkeypatch):
    assert api_key_from_env("") is None
    monkeypatch.delenv("LLAVASEG_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable 'LLAVASEG_NO_SUCH_KEY', which is not set"):
        api_key_from_env("LLAVASEG_NO_SUCH_KEY")
    monkeypatch.setenv("LLAVASEG_KEY", "secret")
    assert api_key_from_env("LLAVASEG_KEY") == "secret"


def test_messages_and_urls():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where?"}]},
                {"role": "assistant", "content": "there"}]  # fmt: skip
    assert chat_messages(messages, "data:image/png;base64,AAAA") == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "where?"}]},  # fmt: skip
        {"role": "assistant", "content": "there"},
    ]
    assert base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert verbatim_template("USER: {{ x }}") == "{% raw %}USER: {{ x }}{% endraw %}"
