"""bench/stage1_baselines.py: CPU-seconds of a process tree, forced answer lengths and the batched transformers
baseline on the tiny LLaVA (no vLLM engine), and the wider tiny LLaVA the benchmark builds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "stage1_baselines.py"
_spec = importlib.util.spec_from_file_location("stage1_baselines", _PATH)
baselines = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("stage1_baselines", baselines)  # dataclasses look their module up
_spec.loader.exec_module(baselines)

CpuSnapshot = baselines.CpuSnapshot


def test_cpu_seconds_count_own_new_and_reaped_processes() -> None:
    before = CpuSnapshot(own=10.0, descendants={100: 2.0, 200: 1.0, 300: 4.0}, children=frozenset({100, 200}))
    # 100 ran 3 s more; 200 exited and was reaped (its 1.5 s total now in own); 300, a grandchild, is gone; 400 is new
    after = CpuSnapshot(own=10.0 + 0.5 + 1.5, descendants={100: 5.0, 400: 0.25}, children=frozenset({100, 400}))
    assert baselines.cpu_seconds_between(before, after) == pytest.approx(0.5 + 1.5 - 1.0 + 3.0 + 0.25)
    assert baselines.cpu_seconds_between(before, before) == 0.0


def test_cpu_snapshot_sees_a_busy_child() -> None:
    before = baselines.cpu_snapshot()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\n"
                              "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spent = baselines.cpu_seconds_between(before, baselines.cpu_snapshot())
            if spent >= 0.4:
                break
            time.sleep(0.1)
        assert child.pid in baselines.cpu_snapshot().descendants
        assert spent >= 0.4
    finally:
        child.kill()
        child.wait()


def test_length_check_and_left_pad() -> None:
    assert baselines.length_check([4, 4, 4], 4) == {"expected": 4, "answers": 3, "exact": True, "min": 4, "max": 4}
    assert not baselines.length_check([4, 3], 4)["exact"]
    assert not baselines.length_check([], 4)["exact"]
    ids, masks = baselines.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids == [[5, 6, 7], [0, 0, 8]] and masks == [[1, 1, 1], [0, 0, 1]]


def test_thread_env() -> None:
    env = baselines.thread_env(2, vllm_multiprocessing=False)
    assert env["OMP_NUM_THREADS"] == "2" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    with pytest.raises(ValueError):
        baselines.thread_env(0, vllm_multiprocessing=False)


def test_forced_lengths_sequential_and_batched_transformers_agree(tiny_llava_dir: Path, demo_images) -> None:
    from stage1_reason.engine import Sample, TransformersBackend, run_chain_of_thought

    samples = [Sample(f"demo/{i}", phrase, "phrase", image) for i, (image, phrase) in enumerate(demo_images[:3])]
    lengths = (12, 5)
    sequential = baselines.ForcedLengths(TransformersBackend(str(tiny_llava_dir), max_model_len=1024), lengths)
    batched = baselines.ForcedLengths(
        baselines.BatchedTransformersBackend(str(tiny_llava_dir), batch_size=2, max_model_len=1024), lengths
    )
    reference = run_chain_of_thought(sequential, samples)
    outputs = run_chain_of_thought(batched, samples)
    for forced in (sequential, batched):
        assert forced.counts == [[12] * 3, [5] * 3]
        assert [baselines.length_check(c, n)["exact"] for c, n in zip(forced.counts, lengths)] == [True, True]
    assert [out.status for out in outputs] == ["ok"] * 3
    assert [(o.reason_answer, o.target_attribute_answer) for o in outputs] == [
        (o.reason_answer, o.target_attribute_answer) for o in reference
    ]
    with pytest.raises(RuntimeError, match="generate call 3 of a 2-turn chain"):
        sequential.generate([])
    sequential.close()
    batched.close()


def test_wider_tiny_llava(tmp_path: Path, tiny_llava_dir: Path) -> None:
    from stage1_reason.tiny_model import COMPLETE_MARKER, build_tiny_llava, tiny_size_name

    assert tiny_size_name("tiny-llava", 128, 2) == "tiny-llava"
    assert tiny_size_name("tiny-llava", 192, 1) == "tiny-llava-h192-l1"
    folder = build_tiny_llava(tmp_path / "wide", hidden_size=192, num_layers=1)
    text = json.loads((folder / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (192, 1, 3)
    assert json.loads((folder / COMPLETE_MARKER).read_text())["text_size"] == [192, 1]
    assert "text_size" not in json.loads((tiny_llava_dir / COMPLETE_MARKER).read_text())  # old copies stay valid
    with pytest.raises(ValueError, match="multiple of 64"):
        build_tiny_llava(tmp_path / "bad", hidden_size=100)
