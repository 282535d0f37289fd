"""The pieces of ``bench/stage1.py`` that make its comparison fair: forced answer lengths per turn on every backend, the
batched transformers baseline, the thread settings of a side and the CPU-seconds of a process tree.

- ``ForcedLengths`` wraps a backend so that its i-th ``generate`` call in a chain of thought writes exactly
  ``lengths[i]`` tokens (turn 1, then turn 2): vLLM through ``SamplingParams(min_tokens=N, max_tokens=N,
  ignore_eos=True)``, transformers through ``min_new_tokens = max_new_tokens = N``. Both mask the end-of-sequence
  token until N, so greedy decoding picks the same tokens on both sides.
- ``BatchedTransformersBackend`` runs HF ``generate`` over left-padded batches of the same prepared prompts and images
  (each image is processed once, as in the sequential loop).
- ``cpu_snapshot`` / ``cpu_seconds_between``: user + system CPU time of this process, its reaped children and its live
  descendants (vLLM's engine core and worker processes), so a side's CPU cost counts every process it ran on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stage1_reason.engine import Result, TransformersBackend

if TYPE_CHECKING:
    from stage1_reason.engine import _Prepared

DEFAULT_TURN_LENGTHS = (128, 64)  # step-1 answers run 80-200 tokens, merged answers 40-120


def thread_env(threads: int, vllm_multiprocessing: bool) -> dict[str, str]:
    """Environment for a side's process: ``threads`` OpenMP/MKL threads, vLLM in one process unless asked otherwise.

    In vLLM's multiprocess mode its CPU worker would be bound by ``VLLM_CPU_OMP_THREADS_BIND`` ("auto" binds all cores
    but one of the NUMA node); "nobind" leaves it ``OMP_NUM_THREADS`` threads, unpinned, like the transformers side.
    """
    if threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if vllm_multiprocessing else "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds (user + system) of this process with its reaped children, of each live descendant by pid, and which
    descendants are direct children (only those are reaped into ``own``)."""

    own: float
    descendants: dict[int, float] = field(default_factory=dict)
    children: frozenset[int] = frozenset()


def cpu_snapshot() -> CpuSnapshot:
    import psutil

    process = psutil.Process()
    times = process.cpu_times()
    descendants, children = {}, set()
    for child in process.children(recursive=True):
        try:
            child_times, parent = child.cpu_times(), child.ppid()
        except psutil.Error:  # gone between listing and reading
            continue
        descendants[child.pid] = child_times.user + child_times.system
        if parent == process.pid:
            children.add(child.pid)
    own = times.user + times.system + times.children_user + times.children_system
    return CpuSnapshot(own, descendants, frozenset(children))


def cpu_seconds_between(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU seconds spent between two snapshots by this process tree.

    A descendant first seen in ``after`` counts whole (it started in between). A direct child gone by ``after`` was
    reaped: its total is in ``after.own``, so its share before ``before`` is taken back out. A deeper descendant gone by
    ``after`` is not counted after ``before`` (engine processes live through a timed phase).
    """
    spent = after.own - before.own
    for pid, seconds in after.descendants.items():
        spent += seconds - before.descendants.get(pid, 0.0)
    for pid, seconds in before.descendants.items():
        if pid not in after.descendants and pid in before.children:
            spent -= seconds
    return spent


def length_check(counts: list[int], expected: int) -> dict[str, Any]:
    """Whether every answer of a turn has exactly ``expected`` tokens, with the counts' range."""
    return {
        "expected": expected,
        "answers": len(counts),
        "exact": bool(counts) and all(count == expected for count in counts),
        "min": min(counts, default=0),
        "max": max(counts, default=0),
    }


class ForcedLengths:
    """A generation backend whose answers are exactly ``lengths[turn]`` tokens long, turn = its generate calls so far.

    ``run_chain_of_thought`` calls ``generate`` once per turn; call ``new_chain()`` before each chain. The token counts
    of each turn's answers are kept in ``counts`` (``length_check`` reads them).
    """

    def __init__(self, backend: Any, lengths: tuple[int, ...], seed: int = 0):
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"forced lengths must be positive, got {lengths}")
        self.backend = backend
        self.lengths = tuple(lengths)
        self.seed = seed
        self.turn = 0
        self.counts: list[list[int]] = [[] for _ in lengths]

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def max_new_tokens(self) -> int:
        return self.lengths[min(self.turn, len(self.lengths) - 1)]

    def new_chain(self) -> None:
        self.turn = 0

    def reset_counts(self) -> None:
        self.counts = [[] for _ in self.lengths]

    def _force(self, length: int) -> None:
        self.backend.max_new_tokens = length  # also the prompt-length check against max_model_len
        if hasattr(self.backend, "sampling"):  # vLLM
            from vllm import SamplingParams

            self.backend.sampling = SamplingParams(
                temperature=0.0, min_tokens=length, max_tokens=length, ignore_eos=True, seed=self.seed
            )
        else:  # transformers: generate reads min_new_tokens from the generation config
            self.backend.hf_model.generation_config.min_new_tokens = length
            self.backend.hf_model.generation_config.use_cache = True

    def generate(self, requests: list) -> list[Result]:
        if self.turn >= len(self.lengths):
            raise RuntimeError(f"ForcedLengths: generate call {self.turn + 1} of a {len(self.lengths)}-turn chain")
        self._force(self.lengths[self.turn])
        results = self.backend.generate(requests)
        self.counts[self.turn].extend(result.num_tokens for result in results if result.ok)
        self.turn += 1
        return results

    def close(self) -> None:
        self.backend.close()


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token id rows padded on the left to the longest, and their attention masks (0 over the padding)."""
    width = max(len(row) for row in sequences)
    ids = [[pad_id] * (width - len(row)) + list(row) for row in sequences]
    masks = [[0] * (width - len(row)) + [1] * len(row) for row in sequences]
    return ids, masks


class BatchedTransformersBackend(TransformersBackend):
    """The same prompts and images through HF ``generate`` in left-padded batches of ``batch_size``.

    Requests are validated and processed one by one as in ``TransformersBackend`` (same prompts, same image tensors);
    the batch is assembled from those tensors, so no image is processed twice. A failing batch makes its rows errors.
    """

    def __init__(self, model: str, max_new_tokens: int = 48, batch_size: int = 16, **settings: Any):
        super().__init__(model, max_new_tokens, **settings)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size

    def _run_batch(self, batch: list[_Prepared]) -> list[Result]:
        import torch

        tokenizer = self.processor.tokenizer
        ids, masks = left_pad([item.inputs["input_ids"][0].tolist() for item in batch], tokenizer.pad_token_id)
        inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(masks)}
        for name in batch[0].inputs:
            if name not in inputs:
                inputs[name] = torch.cat([item.inputs[name] for item in batch])
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        with torch.inference_mode():
            output = self.hf_model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
        results = []
        for row, item in enumerate(batch):
            new_tokens = output[row, len(ids[row]):].tolist()
            for position, token in enumerate(new_tokens):
                if token in self.eos_ids:
                    new_tokens = new_tokens[: position + 1]
                    break
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            results.append(Result(item.key, text.strip(), len(new_tokens), item.prompt_tokens))
        return results

    def generate(self, requests: list) -> list[Result]:
        prepared, results = self._prepare_all(requests)
        for start in range(0, len(prepared), self.batch_size):
            batch = prepared[start:start + self.batch_size]
            try:
                batch_results = self._run_batch(batch)
            except Exception as exc:
                error = f"transformers batched generation failed: {type(exc).__name__}: {exc}"
                batch_results = [Result(item.key, prompt_tokens=item.prompt_tokens, error=error) for item in batch]
            for item, result in zip(batch, batch_results, strict=True):
                results[item.index] = result
        return [result for result in results if result is not None]


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]
