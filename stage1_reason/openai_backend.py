"""Stage 1 against a running ``vllm serve``: ``stage1.backend = "openai"``.

- Generation (``OpenAIBackend``, the ``GenerationBackend`` interface of ``engine``): the OpenAI-compatible chat
  completions endpoint ``<server_url>/v1/chat/completions``, greedy, images sent as base64 PNG data URLs (after the same
  ``mllm_image`` as the in-process engine, so the server sees the same pixels).
- Hidden-state embeddings (``OpenAIEmbedder``, the embedder interface of ``embed``): vLLM's ``<embed_server_url>/pooling``
  endpoint of a second server started with the pooling runner, e.g.
  ``vllm serve MODEL --runner pooling --convert embed --pooler-config '{"task": "token_embed", "use_activation": false}'``;
  it returns one raw last-layer vector per prompt token. ``input`` mode needs no server for embeddings.

Conversations in ``conversation_format = "chat_template"`` are rendered by the server with the model's own template (as
the in-process engine renders them). ``llava_v1`` is sent as a request chat template that is the locally rendered prompt
itself, which the server accepts only when started with ``--trust-request-chat-template``.

Retries with exponential backoff on 429, 5xx and dropped connections; any other 4xx is that row's error, naming the HTTP
status and the server's message. A server that cannot be reached raises ``ServerUnavailableError`` (before any shard is
touched when it is down from the start; mid-run it stops the job, and a rerun resumes from the finished shards). The API
key is read from the environment variable that ``stage1.api_key_env`` names; it is sent, never written anywhere.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from stage1_reason import prompts
from stage1_reason.embed import EmbedRequest, EmbedResult, _EmbedderBase
from stage1_reason.engine import Request, Result, load_processor, mllm_image
from stage1_reason.llava_conventions import clip_mean_colour

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ServerUnavailableError(ConnectionError):
    """The server cannot be reached (refused, dropped, DNS): nothing per-row about it."""


class RowHttpError(Exception):
    """A non-retryable HTTP answer for one row (4xx), or a retryable one that kept failing."""

    def __init__(self, status: int, message: str, attempts: int = 1):
        retried = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"HTTP {status}{retried}: {message}")
        self.status = status


def base_url(url: str) -> str:
    """``http://host:8000/v1/`` -> ``http://host:8000`` (the server root; endpoints are added to it)."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def api_key_from_env(variable: str) -> str | None:
    """The key in environment variable ``variable`` (None when no variable is configured).

    Raises:
        ValueError: a variable is configured but not set.
    """
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"stage1.api_key_env names the environment variable {variable!r}, which is not set")
    return key


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:500]
    return str(error)[:500]


class ServerClient:
    """One server: JSON requests with retries and backoff, a bearer key, a timeout."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int, backoff: float,
                 concurrency: int = 8):  # fmt: skip
        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        self.retries, self.backoff = retries, backoff

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """The JSON answer. Raises RowHttpError (4xx, or 429/5xx after the retries), ServerUnavailableError."""
        attempts = 0
        while True:
            attempts += 1
            try:
                response = self.client.request(method, path, json=payload)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                    httpx.ConnectTimeout) as error:  # fmt: skip
                if attempts > self.retries:
                    raise ServerUnavailableError(
                        f"{self.url}{path}: server unreachable after {attempts} attempts: {type(error).__name__}: "
                        f"{error}") from error  # fmt: skip
            except httpx.TimeoutException as error:
                if attempts > self.retries:
                    raise RowHttpError(408, f"no answer within the timeout ({error})", attempts) from error
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUSES or attempts > self.retries:
                    raise RowHttpError(response.status_code, _message(response), attempts)
            delay = self.backoff * 2 ** (attempts - 1)
            logger.debug("%s%s: retry %d in %.2fs", self.url, path, attempts, delay)
            time.sleep(delay)

    def probe(self) -> dict[str, str]:
        """The served model name and the server's version; fails fast (no retries) when unreachable."""
        try:
            models = self.client.get("/v1/models", timeout=10)
            version = self.client.get("/version", timeout=10)
        except httpx.HTTPError as error:
            raise ServerUnavailableError(f"cannot reach the vLLM server at {self.url}: {type(error).__name__}: "
                                         f"{error}") from error  # fmt: skip
        if models.status_code != 200:
            raise ServerUnavailableError(f"{self.url}/v1/models answered HTTP {models.status_code}: {_message(models)}")
        served = [entry.get("id") for entry in models.json().get("data", [])]
        if not served:
            raise ServerUnavailableError(f"{self.url}/v1/models lists no model")
        reported = version.json().get("version", "unknown") if version.status_code == 200 else "unknown"
        return {"served_model": str(served[0]), "server_version": str(reported)}

    def close(self) -> None:
        self.client.close()


def image_data_url(image: Any) -> str:
    """A base64 PNG data URL of an image (PNG: lossless, the server decodes the very pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(messages: list[prompts.Message], image_url: str) -> list[dict[str, Any]]:
    """Our conversation with ``{"type": "image"}`` parts -> OpenAI chat messages with ``image_url`` parts."""
    out = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_url}})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


def verbatim_template(prompt: str) -> str:
    """A Jinja chat template that renders exactly ``prompt`` (for formats the server's template does not know)."""
    return "{% raw %}" + prompt + "{% endraw %}"


class _ServerSide:
    """What the backend and the embedder share: the local processor (image padding, placeholders), a client, a pool."""

    def _setup(self, model: str, url: str, settings: dict[str, Any], trust_remote_code: bool) -> None:
        if not url:
            raise ValueError("stage1.backend 'openai' needs a server URL (stage1.server_url / stage1.embed_server_url)")
        self.max_concurrency = int(settings.get("max_concurrency", 8))
        self.server = ServerClient(url, api_key_from_env(settings.get("api_key_env", "")),
                                   float(settings.get("timeout", 120.0)), int(settings.get("retries", 3)),
                                   float(settings.get("retry_backoff", 0.5)), self.max_concurrency)  # fmt: skip
        self.provenance = self.server.probe()  # fails fast, before any shard is touched
        self.served_model = self.provenance["served_model"]
        logger.info("stage 1 server %s: model %s, vLLM %s", self.server.url, self.served_model,
                    self.provenance["server_version"])  # fmt: skip

    def _map(self, function: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1 or self.max_concurrency <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(function, items))  # the first ServerUnavailableError propagates

    def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.close()
            self.server = None


class OpenAIBackend(_ServerSide):
    """Greedy chat completions on a running vLLM server, ``max_concurrency`` requests in flight."""

    def __init__(
        self, model: str, server_url: str, max_new_tokens: int = 48, seed: int = 0,
        conversation_format: str = "chat_template", pad_to_square: bool = False, trust_remote_code: bool = False,
        **settings: Any,
    ):  # fmt: skip
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.model, self.max_new_tokens, self.seed = model, max_new_tokens, seed
        self.conversation_format = conversation_format
        self.processor = load_processor(model, trust_remote_code)
        self.pad_colour = clip_mean_colour(self.processor) if pad_to_square else None
        self._setup(model, server_url, settings, trust_remote_code)

    def _payload(self, request: Request) -> dict[str, Any] | Result:
        if request.error:
            return Result(request.key, error=request.error)
        if request.image is None:
            return Result(request.key, error="no image given for the request")
        try:
            image = mllm_image(request.image, self.pad_colour)
        except (ValueError, OSError) as exc:
            return Result(request.key, error=f"bad image: {exc}")
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder and any(placeholder in text for text in prompts.message_texts(request.messages)):
            message = f"text contains the image placeholder {placeholder!r}; remove it from the query"
            return Result(request.key, error=message)
        payload: dict[str, Any] = {
            "model": self.served_model, "messages": chat_messages(request.messages, image_data_url(image)),
            "max_tokens": self.max_new_tokens, "temperature": 0.0, "seed": self.seed, "n": 1,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "add_special_tokens": True,
        }  # fmt: skip
        if self.conversation_format != "chat_template":
            prompt = prompts.render_prompt(self.processor, request.messages, self.conversation_format)
            payload["chat_template"] = verbatim_template(prompt)
        return payload

    def _one(self, request: Request) -> Result:
        payload = self._payload(request)
        if isinstance(payload, Result):
            return payload
        try:
            answer = self.server.request("POST", "/v1/chat/completions", payload)
        except RowHttpError as error:
            return Result(request.key, error=f"server: {error}")
        choice, usage = answer["choices"][0], answer.get("usage") or {}
        text = (choice.get("message") or {}).get("content") or ""
        return Result(request.key, text.strip(), int(usage.get("completion_tokens", 0)),
                      int(usage.get("prompt_tokens", 0)))  # fmt: skip

    def generate(self, requests: list[Request]) -> list[Result]:
        return self._map(self._one, requests)


class OpenAIEmbedder(_ServerSide, _EmbedderBase):
    """``hidden`` mode through a pooling ``vllm serve``: every prompt token's raw last-layer vector, seg_text's kept."""

    def __init__(
        self, model: str, embed_server_url: str, max_embed_tokens: int = 64, max_model_len: int = 2048,
        trust_remote_code: bool = False, conversation_format: str = "chat_template", pad_to_square: bool = False,
        **settings: Any,
    ):  # fmt: skip
        _EmbedderBase.__init__(self, model, max_embed_tokens, max_model_len, trust_remote_code, conversation_format,
                               pad_to_square)  # fmt: skip
        self._setup(model, embed_server_url, settings, trust_remote_code)
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
        self.dim = int(text_config.hidden_size)

    def _one(self, request: EmbedRequest) -> EmbedResult:
        located = self._span(request)
        if isinstance(located, EmbedResult):
            return located
        span, _, image, total = located
        answer_turn = {"role": "assistant", "content": [{"type": "text", "text": request.seg_text.strip()}]}
        messages = chat_messages(request.messages + [answer_turn], image_data_url(image))
        payload: dict[str, Any] = {
            "model": self.served_model, "messages": messages,
            "add_generation_prompt": False, "continue_final_message": True, "add_special_tokens": True,
            "task": "token_embed", "use_activation": False, "encoding_format": "float",
        }  # fmt: skip
        if self.conversation_format != "chat_template":
            payload["chat_template"] = verbatim_template(span.text)
        try:
            answer = self.server.request("POST", "/pooling", payload)
        except RowHttpError as error:
            return EmbedResult(request.key, error=f"embedding server: {error}")
        vectors = np.asarray(answer["data"][0]["data"], dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != total:
            read = vectors.shape[0] if vectors.ndim else 0
            return EmbedResult(request.key, error=f"embedding server read {read} prompt tokens, the processor {total}: "
                               "the server renders the conversation differently")  # fmt: skip
        return self._result(request.key, span, vectors[-len(span.token_ids):])

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        return self._map(self._one, requests)

    def close(self) -> None:
        _ServerSide.close(self)


def _settings(stage1: Any) -> dict[str, Any]:
    return {"api_key_env": stage1.api_key_env, "max_concurrency": stage1.max_concurrency,
            "timeout": stage1.request_timeout_s, "retries": stage1.request_retries,
            "retry_backoff": stage1.retry_backoff_s}  # fmt: skip


def backend_from_config(stage1: Any, model_path: str) -> OpenAIBackend:
    """The generation backend for ``[stage1]`` (``shared.config.Stage1Config``) with ``backend = "openai"``."""
    return OpenAIBackend(model_path, stage1.server_url, stage1.max_new_tokens, stage1.seed, stage1.conversation_format,
                         stage1.image_pad_to_square, stage1.trust_remote_code, **_settings(stage1))  # fmt: skip


def embedder_from_config(stage1: Any, model_path: str) -> OpenAIEmbedder:
    """The ``hidden``-mode embedder for ``[stage1]`` with ``backend = "openai"``."""
    return OpenAIEmbedder(model_path, stage1.embed_server_url, stage1.max_embed_tokens, stage1.max_model_len,
                          stage1.trust_remote_code, stage1.conversation_format, stage1.image_pad_to_square,
                          **_settings(stage1))  # fmt: skip


def _public_url(url: str) -> str:
    """The URL without user info (``user:password@``), for provenance."""
    from urllib.parse import urlparse

    parsed = urlparse(base_url(url))
    return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()


def server_metadata(stage1: Any) -> dict[str, str]:
    """Shard provenance of the servers a run uses (served model names, reported versions, URLs); probing them first
    makes an unreachable server fail before any shard is touched. Raises ServerUnavailableError."""
    servers = [("server", stage1.server_url)]
    if stage1.embed_mode == "hidden" and not stage1.embed_backend:  # else a local embedder computes them
        servers.append(("embed_server", stage1.embed_server_url))
    metadata = {}
    for role, url in servers:
        client = ServerClient(url, api_key_from_env(stage1.api_key_env), 10.0, 0, 0.0, 1)
        try:
            found = client.probe()
        finally:
            client.close()
        metadata[f"llavaseg.{role}_url"] = _public_url(url)
        metadata[f"llavaseg.{role}_served_model"] = found["served_model"]
        metadata[f"llavaseg.{role}_version"] = found["server_version"]
    return metadata
