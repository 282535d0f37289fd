"""Paths inside a data root: every path a manifest stores is relative to ``[paths].data_root`` and must stay inside it.

Dataset files name other files (COCO ``file_name``, label paths); a name like ``../../etc/passwd`` or a symlink pointing
out of the root must never turn into a file the pipeline reads. ``resolve_inside`` is the one gate for that.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class PathEscapeError(ValueError):
    """A relative path that is absolute, malformed, or resolves outside its root."""


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` (POSIX separators) against ``root``; the result must lie inside ``root``.

    Rejects empty and absolute paths (POSIX or Windows style), NUL bytes, and anything that resolves outside ``root``
    after normalising ``..`` and following symlinks that exist. Returns the resolved absolute path.

    Raises:
        PathEscapeError: naming the offending path and the root.
    """
    text = str(relative)
    if not text or text in (".", "./"):
        raise PathEscapeError(f"empty path relative to {root}")
    if "\0" in text:
        raise PathEscapeError(f"path {text!r} contains a NUL byte")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise PathEscapeError(f"path {text!r} is absolute; expected a path relative to {root}")
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / text).resolve()
    if not candidate.is_relative_to(root_resolved) or candidate == root_resolved:
        raise PathEscapeError(f"path {text!r} resolves to {candidate}, outside {root_resolved}")
    return candidate


def relative_posix(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` with POSIX separators.

    The relative name is computed lexically (a symlinked file keeps its own name), then checked with ``resolve_inside``.

    Raises:
        PathEscapeError: if ``path`` is outside ``root`` or resolves outside it through a symlink.
    """
    root_abs = os.path.abspath(root)
    path_abs = os.path.abspath(path)
    relative = Path(os.path.relpath(path_abs, root_abs)).as_posix()
    if relative == "." or relative == ".." or relative.startswith("../"):
        raise PathEscapeError(f"path {path} is not inside {root_abs}")
    resolve_inside(Path(root), relative)
    return relative


# Weights committed with the project, by the name a config may give instead of a path.
COMMITTED_SAM_CHECKPOINTS = {"mini-sam": Path(__file__).resolve().parents[1] / "weights" / "mini-sam" / "mini_sam.safetensors"}


def resolve_sam_checkpoint(value: str, base_dir: str | Path) -> Path | None:
    """``stage2.sam_checkpoint``: a committed name (``"mini-sam"``), or a path resolved against the config's folder;
    None when empty (a random SAM)."""
    if not value:
        return None
    if value in COMMITTED_SAM_CHECKPOINTS:
        return COMMITTED_SAM_CHECKPOINTS[value]
    return (Path(base_dir) / value).expanduser().resolve()
