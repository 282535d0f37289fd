"""Untrusted files: nothing the pipeline reads can run code; corrupt or hostile files fail with a message naming them.

- Source scan: no unrestricted unpickling (pickle/dill/joblib/numpy allow_pickle/torch.load without weights_only=True)
  in the project's packages, except refs files through ``manifests.refer``'s restricted unpickler; ``trust_remote_code``
  defaults to False everywhere and is never passed as True.
- The restricted unpickler refuses code (os.system, eval, subprocess.Popen, extension codes, object-building opcodes)
  without running it, and refuses memory bombs before allocating.
- Corrupt refs pickles and JSON annotations (random byte and structure changes, absurd nesting) never escape as anything
  but a named error or a counted skip.

A SAM checkpoint holding a pickled object (``print``) is in tests/test_stage2_modeling.py; here it runs a command.
"""

from __future__ import annotations

import ast
import copy
import copyreg
import inspect
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manifests.refer import RefsFileError, load_refs
from manifests.registry import build_manifest
from shared.config import PipelineConfig, Stage1Config, load_config, profile_names

from fixtures_datasets import (
    make_ref,
    rectangle_polygon,
    reasonseg_shape,
    write_coco_json,
    write_jpeg,
    write_reasonseg_item,
    write_refer_dataset,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "manifests", "stage1_reason", "stage2_segment", "llavaseg", "bench")
RESTRICTED_UNPICKLER_FILE = "manifests/refer.py"

# --- source scan --------------------------------------------------------------------------------------------------

UNPICKLING_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads", "yaml.load",
    "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load",
}  # fmt: skip
UNPICKLER_BASES = {"pickle.Unpickler", "_pickle.Unpickler", "pickle._Unpickler"}


def project_files() -> list[Path]:
    found = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    assert len(found) > 40, found  # the packages are where this test expects them
    return found


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (``import numpy as np`` -> {"np": "numpy"})."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, where: str) -> list[str]:
    """Every unrestricted unpickling in ``source``: ``where:line: what``."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in UNPICKLING_CALLS:
                found.append(f"{where}:{node.lineno}: {name}")
            elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif name == "numpy.load" and not _keyword_is(node, "allow_pickle", False) and any(
                k.arg == "allow_pickle" for k in node.keywords
            ):
                found.append(f"{where}:{node.lineno}: numpy.load with allow_pickle")
        elif isinstance(node, ast.ClassDef) and where != RESTRICTED_UNPICKLER_FILE:
            for base in node.bases:
                if _dotted(base, aliases) in UNPICKLER_BASES:
                    found.append(f"{where}:{node.lineno}: an Unpickler subclass outside {RESTRICTED_UNPICKLER_FILE}")
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scan itself, on code that breaks every rule, and on code that follows them."""
    bad = textwrap.dedent(
        """
        import pickle, torch
        import numpy as np
        from pickle import loads as undo
        from torch import load
        import joblib as jl
        pickle.load(f); undo(b); torch.load(f); load(f, weights_only=False); np.load(f, allow_pickle=True); jl.load(f)
        class Mine(pickle.Unpickler): pass
        """
    )
    assert len(unsafe_loads(bad, "x.py")) == 7, unsafe_loads(bad, "x.py")
    good = "import torch, numpy as np\ntorch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\n"
    assert unsafe_loads(good, "x.py") == []


def test_no_unrestricted_unpickling_in_the_project():
    found = []
    for path in project_files():
        found += unsafe_loads(path.read_text(), path.relative_to(REPO).as_posix())
    assert found == []


def test_trust_remote_code_is_off_by_default_and_never_switched_on():
    assert Stage1Config().trust_remote_code is False and PipelineConfig().stage1.trust_remote_code is False
    pipeline_toml = REPO / "pipeline.toml"
    for profile in [None, *profile_names(pipeline_toml)]:
        assert load_config(pipeline_toml, profile, check_paths=False).stage1.trust_remote_code is False, profile
    parameters, problems = [], []
    for path in project_files():
        where = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in positional][len(positional) - len(args.defaults):], args.defaults))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
                if any(a.arg == "trust_remote_code" for a in positional + args.kwonlyargs):
                    parameters.append(f"{where}:{node.name}")
                    default = defaults.get("trust_remote_code")
                    if default is not None and not (isinstance(default, ast.Constant) and default.value is False):
                        problems.append(f"{where}:{node.lineno} {node.name}: default {ast.unparse(default)}")
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code" and isinstance(keyword.value, ast.Constant):
                        if keyword.value.value is not False:
                            problems.append(f"{where}:{node.lineno}: trust_remote_code={keyword.value.value!r}")
    assert problems == []
    assert len(parameters) >= 8, parameters  # the engines, embedders and loaders that take it

    from stage1_reason import embed, engine, run

    constructors = [
        engine.load_processor, engine.load_hf_model, engine.VllmBackend, engine.TransformersBackend,
        embed.TokenIdEmbedder, embed.TransformersEmbedder, embed.VllmEmbedder, run.embedding_dim,
    ]  # fmt: skip
    for constructor in constructors:
        parameter = inspect.signature(constructor).parameters["trust_remote_code"]
        assert parameter.default in (False, inspect.Parameter.empty), constructor


# --- the restricted unpickler -------------------------------------------------------------------------------------


class _Runs:
    """Unpickles to ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    inst = b"(S'" + touch.encode() + b"'\nios\nsystem\n."  # protocol 0 INST: os.system(...)
    py2_eval = b"c__builtin__\neval\n(S'__import__(\"os\").system(\"" + touch.encode() + b"\")'\ntR."
    getattr_gadget = b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nset\nX\x07\x00\x00\x00__new__\x86R."
    set_build = b"\x80\x02cbuiltins\nset\n)R}X\x01\x00\x00\x00a\x88sb."  # BUILD on an admitted set
    copyreg.add_extension(os.system.__module__, "system", 240)
    try:
        extension = pickle.dumps([_Runs(os.system, touch)], protocol=2)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 240)
    assert b"\x82\xf0" in extension  # EXT1 240: os.system without naming it
    return {
        "os.system": pickle.dumps([{"ref_id": 1, "x": _Runs(os.system, touch)}], protocol=2),
        "builtins.eval": pickle.dumps([_Runs(eval, f"__import__('os').system('{touch}')")], protocol=4),
        "subprocess.Popen": pickle.dumps([_Runs(subprocess.Popen, ["touch", str(marker)])], protocol=3),
        "inst": inst,
        "py2 __builtin__.eval": py2_eval,
        "getattr gadget": getattr_gadget,
        "BUILD on a set": set_build,
        "extension code": extension,
    }


EXPECTED_REFUSALS = {
    "os.system": f"refused global '{os.system.__module__}.system'",
    "builtins.eval": "refused global 'builtins.eval'",
    "subprocess.Popen": "refused global 'subprocess.Popen'",
    "inst": "opcode INST at byte",
    "py2 __builtin__.eval": "refused global '__builtin__.eval'",
    "getattr gadget": "refused global 'builtins.getattr'",
    "BUILD on a set": "opcode BUILD at byte",
    "extension code": "opcode EXT1 at byte",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_REFUSALS))
def test_restricted_unpickler_refuses_code_without_running_it(tmp_path, name):
    marker = tmp_path / "ran"
    payload = _payloads(marker)[name]
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(payload)
    copyreg.add_extension(os.system.__module__, "system", 240)  # as if the process had the extension registered
    try:
        with pytest.raises(RefsFileError) as error:
            load_refs(refs_path)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 240)
    assert isinstance(error.value, pickle.UnpicklingError) and isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"{refs_path}: ") and EXPECTED_REFUSALS[name] in str(error.value)
    assert not marker.exists()


def test_cli_manifest_refuses_a_hostile_refs_file_with_a_clear_error(tmp_path):
    marker = tmp_path / "ran"
    root = tmp_path / "data"
    write_refer_dataset(root, "refcoco", [], [], [])
    (root / "refer_seg" / "refcoco" / "refs(unc).p").write_bytes(_payloads(marker)["os.system"])
    out = tmp_path / "refcoco-train.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", "manifest", "refcoco", "--root", str(root), "--split", "train",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    refused = f"refused global '{os.system.__module__}.system'"
    assert f"error: {root}/refer_seg/refcoco/refs(unc).p: {refused}" in result.stderr
    assert not marker.exists() and not out.exists()


MEMORY_LIMITED_LOADS = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a regression fails here, not on the shared machine
from pathlib import Path
from manifests.refer import load_refs
outcomes = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    try:
        load_refs(path)
        outcomes[path.name] = ["loaded", ""]
    except Exception as error:
        outcomes[path.name] = [type(error).__name__, str(error)]
print(json.dumps(outcomes))
"""


def run_memory_limited(folder: Path) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_LIMITED_LOADS, str(folder)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_memory_bombs_are_refused_before_allocating(tmp_path):
    """Length prefixes and memo indices that would make the unpickler allocate gigabytes from a few bytes."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    bombs = {
        "memo": b"\x80\x02]r\xf0\xff\xff\xff.",  # LONG_BINPUT 4294967280: a 32 GiB memo table
        "bytearray8": b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".",
        "bytearray8 backed": b"\x80\x05\x96" + struct.pack("<Q", 3) + b"abc.",
        "binunicode": b"\x80\x02X\xff\xff\xff\xffab.",
        "binbytes8": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"x.",
        "frame": b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"].",
        "deep": b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",  # a list nested 100000 deep
    }
    for name, data in bombs.items():
        (folder / name).write_bytes(data)
    outcomes = run_memory_limited(folder)
    expected = {
        "memo": "memo index 4294967280 at byte 3 is out of range",
        "bytearray8": "corrupt pickle (expected 1099511627776 bytes in a bytearray8, but only 1 remain)",
        "bytearray8 backed": "opcode BYTEARRAY8 at byte 2 is not allowed: a refs file holds only plain containers",
        "binunicode": "corrupt pickle (expected 4294967295 bytes in a unicodestring4, but only 3 remain)",
        "binbytes8": "corrupt pickle (expected 1125899906842624 bytes in a bytes8, but only 2 remain)",
        "frame": "frame of 1152921504606846976 bytes at byte 2 runs past the end",
        "deep": "corrupt pickle: containers nested too deeply",
    }
    for name, text in expected.items():
        kind, message = outcomes[name]
        assert kind == "RefsFileError" and message == f"{folder / name}: {text}", outcomes[name]


FUZZ_REFS = """
import collections, json, pickle, random, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from manifests.refer import RefsFileError, load_refs
from fixtures_datasets import make_ref
good = pickle.dumps([make_ref(i, 100 + i, i, "train", ["the dog", "a cat"]) for i in range(5)], protocol=2)
rng = random.Random(0)
path = Path(sys.argv[1])
outcomes = collections.Counter()
for trial in range(3000):
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        if rng.random() < 0.6:
            data[at] = rng.randrange(256)
        elif rng.random() < 0.5:
            del data[at:at + rng.randint(1, 8)]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    path.write_bytes(bytes(data))
    try:
        refs = load_refs(path)
        outcomes["loaded" if isinstance(refs, list) else "loaded a non-list"] += 1
    except RefsFileError as error:
        outcomes["RefsFileError" if str(error).startswith(str(path)) else "unnamed RefsFileError"] += 1
    except ValueError as error:
        outcomes["ValueError" if str(path) in str(error) else "unnamed ValueError"] += 1
    except BaseException as error:
        outcomes[f"escaped {type(error).__name__}: {error}"[:200]] += 1
print(json.dumps(outcomes))
"""


def test_randomly_corrupted_refs_files_fail_only_with_named_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FUZZ_REFS, str(tmp_path / "refs(unc).p"), str(Path(__file__).parent)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    assert set(outcomes) <= {"loaded", "RefsFileError", "ValueError"}, outcomes
    assert sum(outcomes.values()) == 3000 and outcomes["RefsFileError"] > 2000


# --- JSON annotations -----------------------------------------------------------------------------------------------

DEEP_JSON = "[" * 100_000 + "]" * 100_000
TARGET = reasonseg_shape("target", [[10, 5], [29, 5], [29, 19], [10, 19]])


def test_absurdly_nested_json_is_a_named_error(tmp_path):
    root = tmp_path / "data"
    write_reasonseg_item(root, "val", "good", ["the thing"], False, [TARGET])
    deep = write_reasonseg_item(root, "val", "deep", ["the thing"], False, [TARGET])
    deep.write_text('{"text": ' + DEEP_JSON + "}")
    result = build_manifest("reasonseg", root, "val", tmp_path / "reasonseg-val.parquet")
    assert pq.read_table(result.path).column("sample_id").to_pylist() == ["reasonseg/val/good/0"]
    assert result.skipped == {"unreadable json": 1}
    assert f"{deep}: invalid JSON (maximum recursion depth exceeded" in result.examples["unreadable json"][0]

    instances = write_coco_json(tmp_path / "vlpart" / "pascal_part" / "train.json", [], [])
    instances.write_text('{"images": ' + DEEP_JSON + "}")
    with pytest.raises(ValueError, match=r"pascal_part/train\.json: not valid JSON \(maximum recursion depth"):
        build_manifest("pascal_part", tmp_path, "train", tmp_path / "m.parquet")


WEIRD_VALUES = [None, [], {}, "", "x", -1, 0, 1.5, True, 10**30, [[1, 2]], {"a": 1}, float("nan"), float("inf"),
                "../../etc/passwd", [None], ["a", "b"], [[[[[[[[1]]]]]]]]]  # fmt: skip


def _mutate(document, rng: random.Random):
    """``document`` with 1-3 values replaced by odd ones or keys removed, anywhere in its structure."""
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        locations = []

        def walk(node, path):
            if isinstance(node, dict):
                items = node.items()
            elif isinstance(node, list):
                items = enumerate(node)
            else:
                return
            for key, child in items:
                locations.append(path + (key,))
                walk(child, path + (key,))

        walk(document, ())
        location = rng.choice(locations)
        parent = document
        for key in location[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.15:
            del parent[location[-1]]
        else:
            parent[location[-1]] = copy.deepcopy(rng.choice(WEIRD_VALUES))
    return document


def _refcoco(root: Path, rng: random.Random) -> tuple[str, list[str]]:
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 30, "width": 40} for i in (1, 2)]
    for i in (1, 2):
        write_jpeg(root / "refer_seg/images/mscoco/images/train2014" / f"{i}.jpg", 30, 40)
    annotations = [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": [rectangle_polygon(1, 1, 9, 9)]}
                   for i in (1, 2)]  # fmt: skip
    refs = [make_ref(i, 100 + i, i, "train", ["the dog", "a dog"]) for i in (1, 2)]
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "dog"}]}
    if rng.random() < 0.5:
        refs = _mutate(refs, rng)
    else:
        instances = _mutate(instances, rng)
    folder = write_refer_dataset(root, "refcoco", refs, [], [])
    (folder / "instances.json").write_text(json.dumps(instances))
    return "refcoco", ["refs(unc).p", "instances.json"]


def _pascal_part(root: Path, rng: random.Random) -> tuple[str, list[str]]:
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 30, "width": 40} for i in (1, 2)]
    for i in (1, 2):
        write_jpeg(root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages" / f"{i}.jpg", 30, 40)
    annotations = [{"id": 100 + i, "image_id": i, "category_id": i, "segmentation": [rectangle_polygon(1, 1, 9, 9)]}
                   for i in (1, 2)]  # fmt: skip
    categories = [{"id": 1, "name": "dog:leg"}, {"id": 2, "name": "cat"}]
    document = _mutate({"images": images, "annotations": annotations, "categories": categories}, rng)
    path = root / "vlpart/pascal_part/train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return "pascal_part", ["train.json"]


def _reasonseg(root: Path, rng: random.Random) -> tuple[str, list[str]]:
    annotation = {"text": ["What holds tea?", "the cup"], "is_sentence": True, "shapes": [TARGET]}
    write_reasonseg_item(root, "train", "good", ["the good one"], False, [TARGET])
    bad = write_reasonseg_item(root, "train", "mutated", [], True, [TARGET])
    bad.write_text(json.dumps(_mutate(annotation, rng)))
    return "reasonseg", []  # per-image files: never a build error, only skips


@pytest.mark.parametrize("make_dataset", [_refcoco, _pascal_part, _reasonseg], ids=lambda f: f.__name__[1:])
def test_randomly_malformed_annotations_give_rows_skips_or_a_named_error(tmp_path, make_dataset):
    rng = random.Random(7)
    outcomes = {"built": 0, "named error": 0}
    for trial in range(60):
        root = tmp_path / f"trial{trial}"
        dataset, annotation_files = make_dataset(root, rng)
        try:
            result = build_manifest(dataset, root, "train", root / "manifest.parquet")
        except ValueError as error:
            assert annotation_files and any(name in str(error) for name in annotation_files), (trial, str(error))
            outcomes["named error"] += 1
            continue
        rows = pq.read_table(result.path).to_pylist()
        assert len({row["sample_id"] for row in rows}) == len(rows) == result.rows
        if dataset == "reasonseg":
            assert "reasonseg/train/good/0" in {row["sample_id"] for row in rows}
        outcomes["built"] += 1
    assert outcomes["built"] > 10, outcomes


# --- checkpoints ------------------------------------------------------------------------------------------------------


def test_torch_files_with_a_command_are_refused_without_running_it(tmp_path):
    import torch

    from stage2_segment.checkpoint import TRAINING_STATE_FILE, CheckpointError, load_training_state
    from stage2_segment.modeling.build import SamCheckpointError, build_adapted_sam

    marker = tmp_path / "ran"
    sam_path = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": _Runs(os.system, f"touch {marker}")}, sam_path)
    with pytest.raises(SamCheckpointError, match=r"sam_vit_b\.pth: refused to load.*weights_only"):
        build_adapted_sam("tiny", 32, sam_checkpoint=sam_path)
    checkpoint = tmp_path / "step_000020"
    checkpoint.mkdir()
    torch.save({"optimizer": _Runs(os.system, f"touch {marker}")}, checkpoint / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match=rf"{TRAINING_STATE_FILE}: refused to load.*Weights only load failed"):
        load_training_state(checkpoint)
    assert not marker.exists()
