"""refCOCO family adapter: ``refer_seg/<name>/refs(<splitBy>).p`` + ``instances.json`` -> manifest rows.

Layout as in LISA's ``REFER`` loader: refcoco, refcoco+ and refclef use ``refs(unc).p``, refcocog ``refs(umd).p``;
images live in ``refer_seg/images/mscoco/images/train2014`` (refcoco/+/g) or ``refer_seg/images/saiapr_tc-12``
(refclef).
Every sentence of every ref in the requested split is one sample; its mask is the ref's annotation (COCO polygons or
RLE). Split matching follows REFER: ``testA``/``testB``/``testC`` also match combined splits such as ``testAB``,
``test`` matches every test split.

The refs file is a pickle (often written by Python 2). It is read with ``RestrictedUnpickler``, which builds only plain
containers and scalars and refuses every other global, so a tampered file cannot run code.
"""

from __future__ import annotations

import builtins
import io
import pickle
import pickletools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.coco_format import CocoIndex, checked_image_size, coco_mask_ref, is_record_id, load_coco_json
from manifests.common import ManifestBuilder, SkipSample, dataset_file

FAMILY = "referring"
REFER_DIR = "refer_seg"


@dataclass(frozen=True)
class ReferSpec:
    """Where one refCOCO-family dataset lives and which splits it has."""

    name: str
    split_by: str
    image_dir: str  # relative to data_root
    splits: tuple[str, ...]


_COCO_IMAGES = f"{REFER_DIR}/images/mscoco/images/train2014"
REFER_DATASETS: dict[str, ReferSpec] = {
    "refcoco": ReferSpec("refcoco", "unc", _COCO_IMAGES, ("train", "val", "testA", "testB")),
    "refcoco+": ReferSpec("refcoco+", "unc", _COCO_IMAGES, ("train", "val", "testA", "testB")),
    "refcocog": ReferSpec("refcocog", "umd", _COCO_IMAGES, ("train", "val", "test")),
    "refclef": ReferSpec(
        "refclef", "unc", f"{REFER_DIR}/images/saiapr_tc-12", ("train", "val", "testA", "testB", "testC")
    ),
}

# Globals a refs file may name: plain containers only. Python 2 pickles say __builtin__, Python 3 ones builtins.
_ALLOWED_GLOBALS = {(module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")}


# Opcodes that plain containers and scalars pickle to, protocols 0-4 (Python 2 and 3 writers); GLOBAL/STACK_GLOBAL
# + REDUCE only ever call what ``find_class`` admits (set, frozenset). Opcodes that build arbitrary objects (INST, OBJ,
# NEWOBJ, BUILD), extension codes, persistent ids and out-of-band buffers are refused before unpickling starts.
_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
        "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
        "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
        "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
        "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
        "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
        "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
        "GLOBAL", "STACK_GLOBAL", "REDUCE",
    }
)  # fmt: skip
_MEMO_INDEX_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT"})


def check_pickle_opcodes(data: bytes) -> None:
    """Walk the opcodes of ``data`` without building anything; refuse what a plain-container pickle never holds.

    Besides the opcode allow-list, every memo index must be below the number of opcodes read so far (a writer numbers
    them from 0), and every length prefix must be backed by the bytes that follow: a corrupt or hostile file then cannot
    make the unpickler allocate memory out of proportion to its size.

    Raises:
        pickle.UnpicklingError: naming the opcode and its byte offset, or what is malformed.
    """
    count = 0
    try:
        for opcode, argument, position in pickletools.genops(data):
            count += 1
            if opcode.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(
                    f"opcode {opcode.name} at byte {position} is not allowed: a refs file holds only plain containers"
                )
            if opcode.name in _MEMO_INDEX_OPCODES and not 0 <= argument < count:
                raise pickle.UnpicklingError(f"memo index {argument} at byte {position} is out of range")
            if opcode.name == "FRAME" and argument > len(data) - position:
                raise pickle.UnpicklingError(f"frame of {argument} bytes at byte {position} runs past the end")
    except pickle.UnpicklingError:
        raise
    except (ValueError, EOFError, TypeError) as error:  # truncated, unknown opcode, malformed argument
        raise pickle.UnpicklingError(f"corrupt pickle ({error})") from error


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers and scalars (dict, list, tuple, str, bytes, numbers, set)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(
            f"refused global '{module}.{name}': a refs file may hold only plain containers and scalars"
        )


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler`` after ``check_pickle_opcodes``; Python 2 byte strings become str
    (UTF-8, else Latin-1).

    Raises:
        pickle.UnpicklingError: a refused opcode or global, or a corrupt or absurdly nested pickle.
    """
    check_pickle_opcodes(data)
    try:
        loaded = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        return _decode_bytes(loaded)
    except pickle.UnpicklingError:
        raise
    except RecursionError as error:
        raise pickle.UnpicklingError("corrupt pickle: containers nested too deeply") from error
    except Exception as error:  # a well-formed opcode stream can still be nonsense (APPEND to a str, a bad set item)
        raise pickle.UnpicklingError(f"corrupt pickle ({type(error).__name__}: {error})") from error


def _decode_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_decode_bytes(key): _decode_bytes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_bytes(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode_bytes(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(_decode_bytes(item) for item in value)
    return value


class RefsFileError(pickle.UnpicklingError, ValueError):
    """A refs file that is refused or corrupt; a ValueError too, so callers that report bad input report it."""


def load_refs(path: Path) -> list[dict]:
    """Read a ``refs(*).p`` file safely.

    Raises:
        FileNotFoundError: the file is missing.
        RefsFileError (a pickle.UnpicklingError and a ValueError): it names a global other than a plain container, holds
            a refused opcode, or is corrupt; the message names the file.
        ValueError: it is not a list of dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    try:
        refs = restricted_loads(path.read_bytes())
    except pickle.UnpicklingError as error:
        raise RefsFileError(f"{path}: {error}") from error
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def split_matches(requested: str, ref_split: Any) -> bool:
    """REFER's split rule: testA/B/C match any split containing that letter, test any test split, else equality."""
    if not isinstance(ref_split, str):
        return False
    if requested in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and requested[-1] in ref_split
    if requested == "test":
        return "test" in ref_split
    return ref_split == requested


def build_refer(dataset: str, data_root: Path, split: str) -> ManifestBuilder:
    """Read ``split`` of refcoco / refcoco+ / refcocog / refclef under ``data_root`` into a filled builder."""
    if dataset not in REFER_DATASETS:
        raise ValueError(f"unknown refer dataset {dataset!r}; valid: {', '.join(REFER_DATASETS)}")
    spec = REFER_DATASETS[dataset]
    if split not in spec.splits:
        raise ValueError(f"{dataset} has no split {split!r}; valid: {', '.join(spec.splits)}")
    data_root = Path(data_root)
    dataset_dir = f"{REFER_DIR}/{spec.name}"  # its files follow the data-root rule images follow (dataset_file)
    refs = load_refs(dataset_file(data_root, f"{dataset_dir}/refs({spec.split_by}).p"))
    coco = load_coco_json(dataset_file(data_root, f"{dataset_dir}/instances.json"))
    builder = ManifestBuilder(dataset, split, data_root)

    refs_by_image: dict[Any, list[dict]] = defaultdict(list)
    for position, ref in enumerate(refs):
        if not split_matches(split, ref.get("split")):
            continue
        bad = [key for key in ("ref_id", "ann_id", "image_id") if not is_record_id(ref.get(key))]
        if not isinstance(ref.get("sentences"), list):
            bad.append("sentences")
        if bad:
            builder.skip("malformed ref", f"refs[{position}]: missing or bad {bad}")
            continue
        refs_by_image[ref["image_id"]].append(ref)

    for image_id in tqdm(sorted(refs_by_image, key=_id_order), desc=f"{dataset}/{split}", unit="image"):
        image_refs = sorted(refs_by_image[image_id], key=lambda ref: _id_order(ref["ref_id"]))
        _add_image(builder, spec, coco, image_id, image_refs)
    return builder


def _id_order(value: Any) -> tuple[int, Any]:
    """Sort key for ids: integers numerically, anything else by its text after them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def _add_image(builder: ManifestBuilder, spec: ReferSpec, coco: CocoIndex, image_id: Any, refs: list[dict]) -> None:
    """Add every sentence of ``refs`` (all on image ``image_id``); query indices run over the image's sentences."""
    n_sentences = sum(len(ref["sentences"]) for ref in refs)
    image = coco.images.get(image_id)
    if image is None:
        builder.skip("image record missing", f"image_id {image_id!r} not in {coco.path.name}", n_sentences)
        return
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        builder.skip("image record missing", f"image_id {image_id!r} has no file_name", n_sentences)
        return
    image_path = f"{spec.image_dir}/{file_name}"
    try:
        height, width = checked_image_size(builder, image, image_path, f"image_id {image_id!r}")
    except SkipSample as skip:
        builder.skip(skip.reason, skip.detail, n_sentences)
        return

    query_index = -1
    for ref in refs:
        where = f"ref_id {ref['ref_id']!r} (image_id {image_id!r})"
        sentences = ref["sentences"]
        first_index = query_index + 1
        query_index += len(sentences)
        annotation = coco.annotations.get(ref["ann_id"])
        if annotation is None:
            detail = f"{where}: ann_id {ref['ann_id']!r} not in instances.json"
            builder.skip("annotation missing", detail, len(sentences))
            continue
        try:
            mask = coco_mask_ref([annotation], height, width, where)
        except SkipSample as skip:
            builder.skip(skip.reason, skip.detail, len(sentences))
            continue
        for offset, sentence in enumerate(sentences):
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                builder.skip("empty query", f"{where}: sentences[{offset}] has no text")
                continue
            builder.add_unless_duplicate(
                image_id=str(image_id),
                query_index=first_index + offset,
                family=FAMILY,
                image_path=image_path,
                query=text.strip(),
                query_kind="phrase",
                mask=mask,
                height=height,
                width=width,
                source=f"{spec.name}/refs({spec.split_by}).p {where} sentences[{offset}]",
            )
