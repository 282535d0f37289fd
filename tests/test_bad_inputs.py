"""Bad input, case by case: each gets a clear message naming the file, row or key, and nothing else is lost.

Manifests are built by the real adapters from tiny datasets in their on-disk formats; config errors go through the CLI;
shard and checkpoint failures through the real writers and loaders. Covered elsewhere and not repeated here:
image decoding by mode, EXIF and pixel limit in tests/test_images.py; a symlinked image escaping the data root in
tests/test_manifests_reasonseg.py, a ``../`` file name in tests/test_manifests_refer.py; an empty query beside a good
one in tests/test_manifests_reasonseg.py, COCO polygons of fewer than 3 points in tests/test_manifests_refer.py; the
over-long, empty and unreadable rows as stage-1 error rows in tests/test_stage1_run.py; unknown keys, wrong types and a
missing profile in ``load_config`` in tests/test_config.py; an undone, foreign-run, old-schema or truncated shard on
read in tests/test_shards.py; a SAM checkpoint of another variant or with pickled objects in
tests/test_stage2_modeling.py; SIGKILL and a full disk during a whole stage-1 run in tests/test_faults_stage1.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors import SafetensorError

from manifests.registry import build_manifest
from shared import shards
from shared.images import ImageLoadError, load_rgb
from shared.masks import rasterize

from fixtures_datasets import (
    make_ref,
    rectangle_polygon,
    reasonseg_shape,
    write_jpeg,
    write_reasonseg_item,
    write_refer_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SPLIT_DIR = "reason_seg/ReasonSeg/train"
TARGET = reasonseg_shape("target", [[5, 5], [30, 5], [30, 35], [5, 35]])
LONG_QUERY = ("Which object would you pick up first if you had to tidy this table? " * 200)[:10000]
CP1252_QUERY = "the “naïve” café sign"


# --- images the adapters meet -------------------------------------------------------------------------------------


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) is patched to declare ``width`` x ``height``: a decompression
    bomb's header, without its pixels."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide x 40 high with EXIF orientation 6: upright it is 40 wide x 60 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (60, 40), (200, 30, 30)), "JPEG", exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    image = Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50).astype(np.uint8) % 3, mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    return encode(image, "PNG", transparency=1)


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


# name -> the bytes of its .jpg (None: no image file). Each item has one query and one target polygon.
IMAGE_CASES: dict[str, bytes | None] = {
    "good": encode(Image.new("RGB", (50, 40), (10, 120, 200)), "JPEG"),
    "missing": None,
    "zero_byte": b"",
    "truncated": truncated_jpeg(),
    "rgba_png": encode(Image.new("RGBA", (50, 40), (10, 20, 30, 128)), "PNG"),
    "palette_png": palette_png_with_transparency(),
    "png16": encode(Image.fromarray(np.full((40, 50), 40000, np.uint16)), "PNG"),
    "grayscale": encode(Image.new("L", (50, 40), 77), "JPEG"),
    "cmyk": encode(Image.new("CMYK", (50, 40), (0, 255, 0, 0)), "JPEG"),
    "exif_rotated": exif_rotated_jpeg(),
    "huge": jpeg_declaring(30000, 30000),
}
KEPT = {"good", "truncated", "rgba_png", "palette_png", "png16", "grayscale", "cmyk", "exif_rotated"}


@pytest.fixture(scope="module")
def bad_reasonseg(tmp_path_factory):
    """A ReasonSeg train split where most items are broken in one way each; returns (data_root, result, rows by id)."""
    root = tmp_path_factory.mktemp("bad_reasonseg") / "data"
    split_dir = root / SPLIT_DIR
    for name, image in IMAGE_CASES.items():
        write_reasonseg_item(root, "train", name, [f"the {name} thing"], False, [TARGET], with_image=False)
        if image is not None:
            (split_dir / f"{name}.jpg").write_bytes(image)

    def item(name: str, text: list, shapes: list[dict], encoding: str = "utf-8") -> None:
        write_reasonseg_item(root, "train", name, text, False, shapes, size=(40, 50), encoding=encoding)

    item("two_points", ["the line"], [reasonseg_shape("target", [[5, 5], [20, 5]])])
    item("outside", ["the lost thing"], [TARGET, reasonseg_shape("target", [[60, 5], [80, 5], [80, 30]])])
    item("cp1252", [CP1252_QUERY], [TARGET], encoding="cp1252")
    item("long_query", [LONG_QUERY], [TARGET])
    item("no_query", [], [TARGET])
    item("undecodable", ["q"], [TARGET])
    (split_dir / "undecodable.json").write_bytes(b'{"text": ["caf\x81"], "is_sentence": false, "shapes": []}')
    result = build_manifest("reasonseg", root, "train", tmp_path_factory.mktemp("out") / "reasonseg-train.parquet")
    rows = {row["image_id"]: row for row in pq.read_table(result.path).to_pylist()}
    return root, result, rows


def test_the_rest_builds_and_every_skip_is_counted(bad_reasonseg):
    _, result, rows = bad_reasonseg
    assert sorted(rows) == sorted(KEPT | {"two_points", "cp1252", "long_query"})
    assert result.skipped == {
        "image missing": 1,
        "image unreadable": 2,  # zero_byte, huge
        "polygon outside image": 1,
        "no query": 1,
        "unreadable json": 1,
    }


@pytest.mark.parametrize(
    "reason, expected",
    [
        ("image missing", ["missing.json: reason_seg/ReasonSeg/train/missing.jpg not found under"]),
        ("image unreadable", ["zero_byte.jpg: zero-byte file",
                              "huge.jpg: image too large: 30000x30000 = 900000000 pixels > limit 178956970"]),
        ("polygon outside image", ["outside.json: shape 'target' spanning x 60..80, y 5..30 lies entirely outside "
                                   "the 40x50 image"]),
        ("no query", ["no_query.json: 'text' holds no query"]),
        ("unreadable json", ["undecodable.json: neither UTF-8 nor cp1252"]),
    ],
)  # fmt: skip
def test_skip_messages_name_the_file_and_the_problem(bad_reasonseg, reason, expected):
    _, result, _ = bad_reasonseg
    examples = result.examples[reason]
    assert len(examples) == len(expected)
    for example, text in zip(sorted(examples), sorted(expected)):
        assert text in example, example


@pytest.mark.parametrize("name", sorted(KEPT - {"truncated"}))
def test_any_image_mode_keeps_manifest_size_equal_to_the_decoded_image(bad_reasonseg, name):
    """Alpha, palette, 16-bit, grayscale, CMYK, EXIF rotation: the manifest's height x width is the shape load_rgb
    returns (after orientation), and the mask rasterises at that size."""
    root, _, rows = bad_reasonseg
    row = rows[name]
    image = load_rgb(root / row["image_path"])
    assert image.dtype == np.uint8 and image.shape == (row["height"], row["width"], 3)
    assert rasterize(row["mask"], row["height"], row["width"], root).shape == image.shape[:2]
    expected_size = (60, 40) if name == "exif_rotated" else (40, 50)
    assert (row["height"], row["width"]) == expected_size


def test_exif_rotation_turns_the_pixels_too(bad_reasonseg):
    root, _, rows = bad_reasonseg
    image = load_rgb(root / rows["exif_rotated"]["image_path"])
    assert image.shape == (60, 40, 3) and image[30, 20, 0] > 180 and image[30, 20, 1] < 80


def test_truncated_jpeg_is_kept_by_its_header_and_refused_at_decode(bad_reasonseg):
    """The manifest sizes images from their headers only; the full decode (stage 1, stage 2) names the file. Stage 1
    turns it into an error row: tests/test_stage1_run.py::test_bad_rows_become_error_rows."""
    root, _, rows = bad_reasonseg
    assert (rows["truncated"]["height"], rows["truncated"]["width"]) == (40, 50)
    with pytest.raises(ImageLoadError, match=r"truncated\.jpg: truncated or corrupt image"):
        load_rgb(root / rows["truncated"]["image_path"])


def test_two_point_polygon_is_drawn_as_lisa_draws_it(bad_reasonseg):
    root, _, rows = bad_reasonseg
    mask = rasterize(rows["two_points"]["mask"], 40, 50, root)
    expected = np.zeros((40, 50), np.uint8)
    expected[5, 5:21] = 1  # cv2 draws a closed two-point polygon as its line
    np.testing.assert_array_equal(mask, expected)


def test_queries_survive_cp1252_and_length(bad_reasonseg):
    _, _, rows = bad_reasonseg
    assert rows["cp1252"]["query"] == CP1252_QUERY
    assert rows["long_query"]["query"] == LONG_QUERY and len(LONG_QUERY) == 10000  # stage 1 makes it an error row


# --- COCO-format datasets: duplicate ids, polygons outside the image ------------------------------------------------

COCO_DIR = "refer_seg/images/mscoco/images/train2014"


def test_refcoco_duplicate_sample_id_and_outside_polygon_are_skipped_the_rest_builds(tmp_path):
    root = tmp_path / "data"
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 30, "width": 40},
        {"id": "1", "file_name": "b.jpg", "height": 30, "width": 40},  # same sample ids as image 1
        {"id": 2, "file_name": "c.jpg", "height": 30, "width": 40},
        {"id": 3, "file_name": "d.jpg", "height": 30, "width": 40},
    ]
    for name in ("a", "b", "c", "d"):
        write_jpeg(root / COCO_DIR / f"{name}.jpg", 30, 40)
    annotations = [
        {"id": 101, "image_id": 1, "category_id": 1, "segmentation": [rectangle_polygon(1, 1, 9, 9)]},
        {"id": 102, "image_id": "1", "category_id": 1, "segmentation": [rectangle_polygon(2, 2, 8, 8)]},
        {"id": 103, "image_id": 2, "category_id": 1,
         "segmentation": [rectangle_polygon(1, 1, 9, 9), rectangle_polygon(50, 1, 60, 9)]},
        {"id": 104, "image_id": 3, "category_id": 1, "segmentation": [rectangle_polygon(3, 3, 12, 12)]},
    ]  # fmt: skip
    refs = [
        make_ref(1, 101, 1, "train", ["left dog"]),
        dict(make_ref(2, 102, 1, "train", ["right dog"]), image_id="1"),
        make_ref(3, 103, 2, "train", ["half outside"]),
        make_ref(4, 104, 3, "train", ["the cat"]),
    ]
    write_refer_dataset(root, "refcoco", refs, images, annotations)
    result = build_manifest("refcoco", root, "train", tmp_path / "refcoco-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    assert [(row["sample_id"], row["query"]) for row in rows] == [
        ("refcoco/train/1/0", "left dog"),  # the first of the two, kept
        ("refcoco/train/3/0", "the cat"),
    ]
    assert result.skipped == {"duplicate sample_id": 1, "invalid segmentation": 1}
    (duplicate,) = result.examples["duplicate sample_id"]
    assert "duplicate sample_id 'refcoco/train/1/0'" in duplicate
    assert "ref_id 2 (image_id '1')" in duplicate
    assert "first from refcoco/refs(unc).p ref_id 1 (image_id 1)" in duplicate
    (outside,) = result.examples["invalid segmentation"]
    assert "ref_id 3 (image_id 2): annotation 103: polygon 1 lies entirely outside the 30x40 image" in outside


# --- config errors through the CLI ------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_every_config_error_at_once_and_exits_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        textwrap.dedent(
            """
            [stage1]
            modle = "tiny-llava"
            max_new_tokens = "many"
            model = "./models/absent-llava"
            [stage2]
            sam_variant = "vit_b"
            sam_checkpoint = "weights/absent_sam.pth"
            """
        )
    )
    result = run_cli("prepare", "--config", str(config), "--profile", "paper-13b", "stage1.shard_size=0", cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert f"error: 6 problems in {config} (profile paper-13b):" in result.stderr
    for line in (
        "  - profiles.paper-13b: no such profile (have: none)",
        "  - stage1.modle: unknown key (did you mean 'model'?)",
        "  - stage1.max_new_tokens: expected int, got str ('many')",
        "  - stage1.shard_size: must be > 0, got 0",
        f"  - stage2.sam_checkpoint: file not found: {tmp_path}/weights/absent_sam.pth",
        f"  - stage1.model: local model path not found: {tmp_path}/models/absent-llava",
    ):
        assert line in result.stderr.splitlines(), result.stderr
    assert not (tmp_path / "work").exists()  # nothing started


def test_cli_names_the_line_of_broken_toml(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text('[stage1]\nmodel = "tiny-llava\n')
    result = run_cli("reason", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: 1 problem in {config}:" in result.stderr
    assert "not valid TOML" in result.stderr and "line 2" in result.stderr


# --- shards -----------------------------------------------------------------------------------------------------------

DIM = 8


def shard_table(ids: list[str], run: str = "run-a", version: str | None = None) -> pa.Table:
    """A stage-1 shard of ``ids`` (two tokens each) from run ``run``."""
    schema = shards.shard_schema(DIM, {"llavaseg.run_key": run})
    if version is not None:
        schema = schema.with_metadata({**schema.metadata, b"llavaseg.shard_schema_version": version.encode()})
    embeddings = [np.random.default_rng(i).standard_normal((2, DIM)).astype(np.float16) for i in range(len(ids))]
    columns = {name: [None] * len(ids) for name in schema.names}
    columns.update(sample_id=ids, status=["ok"] * len(ids), token_ids=[[1, 2]] * len(ids))
    arrays = [
        shards.embeddings_to_arrow(embeddings, DIM) if f.name == "embedding" else pa.array(columns[f.name], type=f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


IDS = [f"demo/val/img{i}/0" for i in range(6)]


def test_a_damaged_done_shard_is_not_done_so_a_rerun_redoes_it(tmp_path):
    path = tmp_path / "m" / shards.shard_name(0)
    shards.write_shard(shard_table(IDS), path, {})
    assert shards.is_done(path, IDS) and shards.is_done(path, IDS, expected_run_key="run-a")
    assert not shards.is_done(path, IDS, expected_run_key="run-b")

    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # truncated after it was marked done
    assert not shards.is_done(path, IDS)
    with pytest.raises(shards.ShardError, match=r"00000\.parquet: refused, its content sha256"):
        shards.read_shards(path.parent)

    pq.write_table(shard_table(IDS, run="run-b"), path)  # another run's shard copied over it
    assert not shards.is_done(path, IDS)  # its bytes are not the ones marked done
    shards.write_shard(shard_table(IDS, run="run-b"), path, {})  # ... or written and marked by the other run
    assert shards.is_done(path, IDS) and not shards.is_done(path, IDS, expected_run_key="run-a")
    pq.write_table(shard_table(IDS, version="0"), path)  # an older schema version
    assert not shards.is_done(path, IDS)
    pq.write_table(shard_table(IDS[:3]), path)  # fewer rows than the done file says
    assert not shards.is_done(path, IDS)
    path.write_bytes(whole)
    shards.done_path(path).write_text('{"rows": 6, "ids_dig')  # a torn done file
    assert not shards.is_done(path, IDS)


def test_an_output_shard_without_stage1_metadata_can_still_be_done(tmp_path):
    """Stage 2's prediction shards use the same writer and done files but carry no stage-1 schema metadata."""
    path = tmp_path / "predictions" / shards.shard_name(0)
    shards.write_shard(pa.table({"sample_id": IDS, "score": [0.5] * 6}), path, {"checkpoint": "abc"})
    assert shards.is_done(path, IDS) and not shards.is_done(path, IDS[:5])


WRITE_UNDER_LIMIT = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from shared import shards
from test_bad_inputs import IDS, shard_table

limit = int(sys.argv[2])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
table = shard_table(IDS * 400)  # 2400 rows of float16 embeddings: far above the limit
try:
    shards.write_shard(table, Path(sys.argv[1]), {{"errors": 0}})
except shards.ShardWriteError as error:
    print(f"{{error.errno}}|{{error}}")
    sys.exit(3)
"""


def test_full_disk_shard_write_fails_clearly_leaves_nothing_and_a_rerun_completes(tmp_path):
    import errno

    path = tmp_path / "run" / "reasonseg-val" / shards.shard_name(2)
    script = WRITE_UNDER_LIMIT.format(tests=str(Path(__file__).parent))
    failed = subprocess.run(
        [sys.executable, "-c", script, str(path), str(16 * 1024)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 3, failed.stderr
    code, message = failed.stdout.strip().split("|", 1)
    assert int(code) == errno.EFBIG
    assert message == f"[Errno 27] {path}: could not be written (File too large); not marked done, a rerun redoes it"
    assert list(path.parent.iterdir()) == []  # no shard, no temp file, no done file
    assert not shards.is_done(path, IDS * 400)

    rerun = subprocess.run(
        [sys.executable, "-c", script, str(path), "0"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert shards.is_done(path, IDS * 400)
    assert shards.read_shards(path.parent).column("sample_id").to_pylist() == IDS * 400


# --- SAM checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam_state() -> dict:
    """An official-layout state dict of the tiny SAM variant (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    from segment_anything.modeling import Sam

    from stage2_segment.modeling.build import build_sam_parts, get_variant

    return {key: value.contiguous() for key, value in Sam(*build_sam_parts(get_variant("tiny"))).state_dict().items()}


def test_truncated_torch_checkpoint_names_the_file(tmp_path, tiny_sam_state):
    import torch

    from stage2_segment.modeling.build import SamCheckpointError, build_adapted_sam

    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamCheckpointError, match=r"sam_tiny\.pth: not a readable torch checkpoint"):
        build_adapted_sam("tiny", 32, sam_checkpoint=path)


def test_truncated_safetensors_checkpoint_names_the_file(tmp_path, tiny_sam_state):
    from safetensors.torch import save_file

    from stage2_segment.modeling.build import SamCheckpointError, build_adapted_sam

    path = tmp_path / "sam_tiny.safetensors"
    save_file(tiny_sam_state, str(path))
    model = build_adapted_sam("tiny", 32, sam_checkpoint=path)  # whole: loads
    assert model.build_args["sam_checkpoint"] == str(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamCheckpointError, match=r"sam_tiny\.safetensors"):
        build_adapted_sam("tiny", 32, sam_checkpoint=path)
