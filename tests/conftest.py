"""Session-wide fixtures: a work folder, the tiny LLaVA, and one vLLM engine of each kind for the whole test session
(plus one on the trained mini LLaVA).

vLLM takes ~20 s to start on CPU, so every test shares the generation engine and the pooling (embedding) engine below;
both are created on first use only. Settings are CPU-friendly: float32 (the only dtype in which vLLM and transformers
greedy outputs agree token for token), eager mode, a 1 GiB KV cache, max_model_len 2048.
"""

from __future__ import annotations

import os

# vLLM on CPU: a fixed small KV cache instead of a share of RAM (the machine is shared); quiet logs; no tokenizer
# threads that would be forked into vLLM's worker processes.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

TINY_ENGINE_SETTINGS = {
    "dtype": "float32",
    "max_model_len": 2048,
    "enforce_eager": True,
    "gpu_memory_utilization": 0.1,
    "seed": 0,
}
TINY_MAX_NEW_TOKENS = 48
TINY_MAX_EMBED_TOKENS = 16  # below the typical answer length, so the cap is exercised
MINI_MAX_NEW_TOKENS = 96  # the mini LLaVA's merged answers run to ~55 tokens


@pytest.fixture(scope="session")
def tiny_engine_settings() -> dict:
    """vLLM engine settings for tiny models in tests (pass with ``**``; add max_new_tokens or max_embed_tokens)."""
    return dict(TINY_ENGINE_SETTINGS)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def tiny_llava_dir(work_dir: Path) -> Path:
    from stage1_reason.tiny_model import build_tiny_llava

    return build_tiny_llava(work_dir / "models" / "tiny-llava")


@pytest.fixture(scope="session")
def vllm_generation_engine(tiny_llava_dir: Path) -> Iterator:
    """The session's vLLM generation backend on the tiny LLaVA (greedy, max_new_tokens 48)."""
    from stage1_reason.engine import VllmBackend

    backend = VllmBackend(str(tiny_llava_dir), max_new_tokens=TINY_MAX_NEW_TOKENS, **TINY_ENGINE_SETTINGS)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_pooling_engine(tiny_llava_dir: Path) -> Iterator:
    """The session's vLLM hidden-state embedder on the tiny LLaVA (max_embed_tokens 16)."""
    from stage1_reason.embed import VllmEmbedder

    embedder = VllmEmbedder(str(tiny_llava_dir), max_embed_tokens=TINY_MAX_EMBED_TOKENS, **TINY_ENGINE_SETTINGS)
    yield embedder
    embedder.close()


SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30)}


def draw_demo_image(seed: int, size: tuple[int, int] = (160, 120)) -> tuple[Image.Image, str]:
    """Three coloured shapes on a grey background; returns the image and a phrase naming one ("the red circle")."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    names = []
    for _ in range(3):
        colour = list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))]
        shape = ("circle", "square")[rng.integers(2)]
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        box = (x, y, x + 30 + int(rng.integers(10)), y + 30 + int(rng.integers(10)))
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=SHAPE_COLOURS[colour])
        names.append(f"the {colour} {shape}")
    return image, names[0]


@pytest.fixture(scope="session")
def draw_demo():
    """``draw_demo(seed, (width, height)) -> (image, phrase)``: a demo-like picture of any size."""
    return draw_demo_image


@pytest.fixture(scope="session")
def demo_images() -> list[tuple[Image.Image, str]]:
    """Eight demo-like (image, phrase) pairs of varied sizes."""
    return [draw_demo_image(seed, (120 + 13 * seed, 100 + 7 * seed)) for seed in range(8)]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One S3-compatible server (moto) on 127.0.0.1 for the session, with its bucket; the AWS environment that reaches
    it is set for this process and every process it starts (Ray workers included)."""
    from s3_server import BUCKET, S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[None]:
    """One local Ray cluster (2 CPUs) for the whole test session; its workers reach the session's S3 server."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mini_llava_dir() -> Path:
    """The committed trained mini LLaVA (weights/mini-llava)."""
    from stage1_reason.tiny_model import resolve_model

    return Path(resolve_model("mini-llava", Path(".")))


@pytest.fixture(scope="session")
def vllm_mini_engine(mini_llava_dir: Path) -> Iterator:
    """The session's vLLM generation backend on the mini LLaVA (greedy, max_new_tokens 96)."""
    from stage1_reason.engine import VllmBackend

    backend = VllmBackend(str(mini_llava_dir), max_new_tokens=MINI_MAX_NEW_TOKENS, **TINY_ENGINE_SETTINGS)
    yield backend
    backend.close()
