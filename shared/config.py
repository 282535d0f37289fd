"""`pipeline.toml` -> frozen dataclasses.

The file holds the embedded demo defaults (top-level sections) and named profiles (`[profiles.<name>.<section>]`) that are
deep-merged over them. `key=value` overrides (dotted keys, TOML literal values) are applied last. Validation is done once
and reports every problem at once (types, choices, and values that cannot work: ``shared.config_values``), each
naming its key, like::

    ConfigError: 3 problems in pipeline.toml (profile paper-13b):
      - stage1.modle: unknown key (did you mean 'model'?)
      - stage2.lr: expected float, got str ('fast')
      - stage2.sam_checkpoint: file not found: /weights/sam_vit_h.pth
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config_values import value_problems
from shared.object_store import ObjectStore, store_for
from shared.paths import resolve_sam_checkpoint

DEFAULT_CONFIG_NAME = "pipeline.toml"


class ConfigError(ValueError):
    """Every problem found in a configuration, listed at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {source}:\n{lines}")


@dataclass(frozen=True)
class PathsConfig:
    data_root: str = "work/demo_data"  # every dataset lives under it, in LISA's layout (reason_seg/, refer_seg/, ...)
    work_dir: str = "work"  # every output goes under it: a folder, or an s3:// URI (see shared/object_store.py)
    mirror_dir: str = ""  # with an s3:// work_dir: this job's local copy (empty = ~/.cache/llavaseg/mirror/<hash>)


@dataclass(frozen=True)
class DataConfig:
    # "<dataset>/<split>" manifests; dataset names as in manifests.registry.ADAPTERS.
    train: list[str] = field(default_factory=lambda: ["reasonseg/train"])
    eval: list[str] = field(default_factory=lambda: ["reasonseg/val"])
    # Sample rates by dataset family for the training mix (LISA: semantic 9 : referring 3 : reasoning 1).
    sample_rates: dict[str, float] = field(default_factory=lambda: {"semantic": 9.0, "referring": 3.0, "reasoning": 1.0})
    # Generate the demo dataset (ReasonSeg format) under data_root before building manifests.
    generate_demo: bool = True
    demo_train_images: int = 48
    demo_val_images: int = 16
    demo_test_images: int = 0
    demo_seed: int = 0  # the demo scenes are a function of it: another seed gives fresh, held-out scenes
    max_samples_per_manifest: int = 0  # 0 = all rows; >0 keeps the first N by sample_id (smoke runs)


@dataclass(frozen=True)
class Stage1Config:
    # "tiny-llava" (built locally under work_dir/models), a local model folder, or a hub id already in the local cache.
    model: str = "tiny-llava"
    backend: str = "vllm"  # vllm | transformers
    prompt_version: str = "v1"  # v1 | v2 (paper Sec. 3.2 word for word)
    cot_steps: int = 3  # 1: embed the step-1 answer; 2: step-2 target; 3: merged step-2/3 answer (paper Table 3a)
    # chat_template (the model's own) | llava_v1 (LLaVA-1.5's system message and "</s>" after each assistant turn)
    conversation_format: str = "chat_template"
    image_pad_to_square: bool = False  # LLaVA-1.5's expand2square (CLIP mean colour) instead of the processor's crop
    # Per dataset family: "mllm" asks the MLLM the step-1 question; "template" simulates step 1 with Q-A templates
    # (paper Sec. 3.4). Families not listed use the MLLM.
    step1_source: dict[str, str] = field(
        default_factory=lambda: {"semantic": "mllm", "referring": "mllm", "reasoning": "mllm"}
    )
    embed_mode: str = "hidden"  # hidden | input
    max_embed_tokens: int = 64  # tokens of seg_text kept (the first ones); shards record the count before the cap
    max_new_tokens: int = 48
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.1
    enforce_eager: bool = True
    trust_remote_code: bool = False
    seed: int = 0
    shard_size: int = 64  # manifest rows per shard; the shard count depends on the input only
    replicas: int = 1  # vLLM engine replicas when run through Ray Data
    use_ray: bool = False
    # backend "openai": a running `vllm serve` (OpenAI-compatible chat completions) instead of an in-process engine
    server_url: str = ""  # e.g. http://127.0.0.1:8000 (generation)
    embed_server_url: str = ""  # a second server with the pooling runner (token_embed); embed_mode "hidden" only
    api_key_env: str = ""  # name of the environment variable holding the API key (the key is never written anywhere)
    max_concurrency: int = 8  # requests in flight per server
    request_timeout_s: float = 300.0
    request_retries: int = 3  # on 429, 5xx and dropped connections, with exponential backoff
    retry_backoff_s: float = 0.5  # first backoff; doubled on each retry
    engine_restarts: int = 2  # per phase: a vLLM engine that died or stalled is restarted this often, then the job stops
    engine_stall_timeout_s: float = 300.0  # an engine whose processes use no CPU time this long is stalled; 0 = off
    # KV cache of each vLLM engine in tokens (0: gpu_memory_utilization sizes it). Size it for a shard's batch:
    # shard_size x (prompt + max_new_tokens); on CPU an explicit size also skips the engine's warm-up pass.
    kv_cache_tokens: int = 0
    # true: the vLLM engine core runs inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in seconds on
    # CPU, but it cannot be watched for stalls (engine_stall_timeout_s does not apply) and a crash ends the job
    engine_in_process: bool = False
    # who computes the hidden-state embeddings: "" = stage1.backend; "transformers" (a sequential forward, no engine
    # start: the fastest for small models on CPU) or "vllm" (one batched prefill on a pooling engine)
    embed_backend: str = ""
    # a shard lease (shared.leases) whose heartbeat is older than this is stale and is taken over by another job
    # (reason and infer); a dead process of the same host loses its leases at once
    lease_timeout_s: float = 300.0


@dataclass(frozen=True)
class Stage2Config:
    sam_variant: str = "tiny"  # vit_h | vit_l | vit_b | tiny | mini (pretrained on the demo world, weights/mini-sam/)
    sam_checkpoint: str = ""  # official SAM checkpoint (local path); empty = random init (tiny only)
    adapter_blocks: list[int] = field(default_factory=list)  # empty = the variant's global-attention blocks
    lr: float = 1e-3  # demo: the tiny random SAM needs a larger step than the paper's 1e-4
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2); LISA: 0.9, 0.95
    grad_clip_norm: float = 0.0  # clip the gradients' global L2 norm at this value; 0 = off; LISA: 1.0
    bce_weight: float = 1.0
    dice_weight: float = 0.5
    global_batch: int = 8
    micro_batch: int = 4
    iterations: int = 200
    warmup_iterations: int = 5
    checkpoint_every: int = 50
    precision: str = "fp32"  # fp32 | bf16 (autocast on GPU)
    seed: int = 0
    eval_batch: int = 8
    loader_workers: int = 0  # data-loading processes per training worker; 0 = load in the training process
    keep_checkpoints: int = 3  # newest complete checkpoints kept in <work_dir>/stage2/<train name>/checkpoints


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty = start a local cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    storage_path: str = ""  # empty = <work_dir>/ray_results; a folder (shared on multi-node clusters) or s3:// URI


@dataclass(frozen=True)
class PipelineConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    ray: RayConfig = field(default_factory=RayConfig)
    # Not from the file: where it came from, so relative paths resolve against the config's folder.
    profile: str = ""
    base_dir: str = "."

    @property
    def data_root(self) -> Path:
        return (Path(self.base_dir) / self.paths.data_root).resolve()

    @property
    def work_dir(self) -> Path:
        """The local work folder; with an ``s3://`` work dir, this job's mirror of it (``work_store``)."""
        store = self.work_store
        if store is not None:
            return store.mirror
        return (Path(self.base_dir) / self.paths.work_dir).resolve()

    @property
    def work_store(self) -> ObjectStore | None:
        """The object store holding the work dir (``paths.work_dir = "s3://..."``), None for a local folder."""
        return store_for(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_resolved(self, folder: Path, name: str = "resolved_config.json") -> Path:
        """Write the resolved config beside an output it produced (a temporary file of this process, then a rename:
        jobs sharing the folder never see a half-written file)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)
        return path


SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "data": DataConfig,
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "ray": RayConfig,
}

CHOICES: dict[str, tuple] = {
    "stage1.backend": ("vllm", "transformers", "openai"),
    "stage1.cot_steps": (1, 2, 3),
    "stage1.prompt_version": ("v1", "v2"),
    "stage1.conversation_format": ("chat_template", "llava_v1"),
    "stage1.embed_mode": ("hidden", "input"),
    "stage1.embed_backend": ("", "vllm", "transformers"),
    "stage1.dtype": ("float32", "float16", "bfloat16", "auto"),
    "stage2.sam_variant": ("vit_h", "vit_l", "vit_b", "tiny", "mini"),
    "stage2.precision": ("fp32", "bf16"),
}

STEP1_FAMILIES = ("reasoning", "referring", "semantic")  # shared.schema.FAMILIES
STEP1_SOURCES = ("template", "mllm")

POSITIVE: tuple[str, ...] = (
    "stage1.max_embed_tokens", "stage1.max_new_tokens", "stage1.max_model_len", "stage1.tensor_parallel_size",
    "stage1.shard_size", "stage1.replicas", "stage2.global_batch", "stage2.micro_batch", "stage2.iterations",
    "stage2.checkpoint_every", "stage2.eval_batch", "ray.num_workers",
)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{args}]"


def _check_type(value: Any, tp: Any) -> Any:
    """Return the value converted to ``tp`` or raise TypeError. int is accepted for float; bool never for numbers."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise TypeError
        return [_check_type(v, item_tp) for v in value]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError
        return {_check_type(k, key_tp): _check_type(v, val_tp) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise TypeError
        return value
    raise TypeError


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stage2.lr=3e-4`` -> (["stage2", "lr"], 3e-4). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key=value"], "command line")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: bad key {key!r}"], "command line")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{'.'.join(path)}: {part} is not a section"], "command line")
    node[path[-1]] = value


def _validate(raw: dict) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name in raw:
        if name not in SECTIONS:
            hint = difflib.get_close_matches(name, list(SECTIONS), n=1)
            problems.append(f"{name}: unknown section" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {type(table).__name__}")
            table = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in table.items():
            if key not in fields:
                hint = difflib.get_close_matches(key, list(fields), n=1)
                problems.append(f"{name}.{key}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
                continue
            try:
                values[key] = _check_type(value, hints[key])
            except TypeError:
                problems.append(
                    f"{name}.{key}: expected {_type_name(hints[key])}, got {type(value).__name__} ({value!r})"
                )
        sections[name] = cls(**values)
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(sections[section], key)
        if value not in allowed:
            problems.append(f"{dotted}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    for dotted in POSITIVE:
        section, key = dotted.split(".")
        value = getattr(sections[section], key)
        if isinstance(value, int) and value <= 0:
            problems.append(f"{dotted}: must be > 0, got {value}")
    problems += value_problems(sections)
    for family, source in sections["stage1"].step1_source.items():
        if family not in STEP1_FAMILIES:
            problems.append(f"stage1.step1_source.{family}: unknown dataset family (have: {', '.join(STEP1_FAMILIES)})")
        if source not in STEP1_SOURCES:
            problems.append(f"stage1.step1_source.{family}: {source!r} is not one of 'template', 'mllm'")
    return sections, problems


def _check_paths(config: PipelineConfig) -> list[str]:
    """Files the config names must exist; checked at load so a typo fails before hours of work."""
    problems = []
    base = Path(config.base_dir)
    if config.stage2.sam_checkpoint:
        ckpt = resolve_sam_checkpoint(config.stage2.sam_checkpoint, base)
        if not ckpt.is_file():
            problems.append(f"stage2.sam_checkpoint: file not found: {ckpt}")
    elif config.stage2.sam_variant != "tiny":
        problems.append(f"stage2.sam_checkpoint: required for sam_variant {config.stage2.sam_variant!r} (official SAM weights)")
    model = config.stage1.model
    if model != "tiny-llava" and (model.startswith(("/", "./", "../", "~")) or Path(model).suffix in {".bin", ".safetensors"}):
        local = (base / Path(model).expanduser())
        if not local.exists():
            problems.append(f"stage1.model: local model path not found: {local}")
    if not config.data.generate_demo and not config.data_root.is_dir():
        problems.append(f"paths.data_root: folder not found: {config.data_root}")
    for key in ("train", "eval"):
        for spec in getattr(config.data, key):
            if spec.count("/") != 1 or not all(spec.split("/")):
                problems.append(f"data.{key}: {spec!r} is not '<dataset>/<split>'")
    return problems


def load_config(
    path: str | Path = DEFAULT_CONFIG_NAME,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    check_paths: bool = True,
) -> PipelineConfig:
    """Load, merge the profile and overrides, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    source = f"{path}" + (f" (profile {profile})" if profile else "")
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"not valid TOML: {err}"], source) from None
    profiles = raw.pop("profiles", {})
    problems: list[str] = []
    if profile:
        if profile not in profiles:
            problems.append(f"profiles.{profile}: no such profile (have: {', '.join(sorted(profiles)) or 'none'})")
        else:
            raw = _deep_merge(raw, profiles[profile])
    for text in overrides:
        try:
            key, value = parse_override(text)
            _apply_override(raw, key, value)
        except ConfigError as err:
            problems.extend(err.problems)
    sections, section_problems = _validate(raw)
    problems.extend(section_problems)
    config = PipelineConfig(**sections, profile=profile or "", base_dir=str(path.resolve().parent))
    if check_paths:
        problems.extend(_check_paths(config))
    if problems:
        raise ConfigError(problems, source)
    return config


def profile_names(path: str | Path = DEFAULT_CONFIG_NAME) -> list[str]:
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return sorted(raw.get("profiles", {}))
