"""The command line's conventions: overrides and -v/-q anywhere, --version, descriptions, exit codes, default checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_datasets import reasonseg_shape, write_reasonseg_item
from llavaseg import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "manifest": ["reasonseg", "--split", "val"],
    "prepare": [],
    "reason": ["--overwrite"],
    "train": [],
    "evaluate": ["--checkpoint", "ck"],
    "infer": ["--checkpoint", "ck", "--out", "o"],
    "segment": ["--image", "a.jpg", "--query", "the red circle"],
    "ablate": [],
    "run": [],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overrides_and_verbosity_anywhere_for_every_command(command):
    options = COMMANDS[command]
    for argv, verbose, quiet in (
        ([command, *options, "paths.work_dir=W", "-v", "stage2.lr=3e-4"], True, False),
        (["-q", "paths.work_dir=W", command, "stage2.lr=3e-4", *options], False, True),
        ([command, "paths.work_dir=W", *options, "stage2.lr=3e-4", "--profile", "paper-7b"], False, False),
    ):
        args = cli.parse_args(argv)
        assert args.func.__name__ == f"cmd_{command}"
        assert args.overrides == ["paths.work_dir=W", "stage2.lr=3e-4"], argv
        assert (args.verbose, args.quiet) == (verbose, quiet), argv
    if command == "manifest":
        assert args.dataset == "reasonseg" and args.split == "val" and args.profile == "paper-7b"


def test_an_option_value_that_looks_like_an_override_stays_a_value():
    args = cli.parse_args(["segment", "--query", "size.big=yes", "--image", "a.jpg", "stage1.seed=3"])
    assert args.query == "size.big=yes" and args.overrides == ["stage1.seed=3"]


def test_unknown_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["train", "not-an-override"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


def test_version_and_help_texts():
    run = subprocess.run([sys.executable, "-m", "llavaseg.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "llavaseg 0.1.0"
    parser = cli.build_parser()
    top = parser.format_help()
    assert "exit codes: 0 ok, 2 usage/config/input error, 1 runtime error" in top
    for command in COMMANDS:
        assert command in top
        sub = subprocess.run([sys.executable, "-m", "llavaseg.cli", command, "--help"], capture_output=True,
                             text=True, cwd=ROOT)  # fmt: skip
        assert sub.returncode == 0
        description = sub.stdout.split("\n\n")[1].strip()
        assert description[0].isupper() and description.endswith(".") and len(description.split()) >= 4, description


def test_manifest_with_an_override_after_its_options_builds(tmp_path):
    data_root = tmp_path / "data"
    square = [[2, 2], [20, 2], [20, 20], [2, 20]]
    write_reasonseg_item(data_root, "val", "a", ["what is here?"], True, [reasonseg_shape("target", square)])
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", "manifest", "reasonseg", "--root", str(data_root), "--split", "val",
         f"paths.work_dir={work}", "-q"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    table = pq.read_table(work / "manifests" / "reasonseg-val.parquet")
    assert table.num_rows == 1 and table["query"].to_pylist() == ["what is here?"]


def test_evaluate_without_a_trained_checkpoint_names_the_train_command(tmp_path):
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", "evaluate", f"paths.work_dir={work}", "data.demo_train_images=2",
         "data.demo_val_images=2", f"paths.data_root={tmp_path / 'data'}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2
    assert "llavaseg train" in run.stderr and "Traceback" not in run.stderr


def _prepare(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llavaseg.cli", "prepare", *flags, f"paths.work_dir={tmp_path / 'work'}",
         f"paths.data_root={tmp_path / 'data'}", "data.demo_train_images=2", "data.demo_val_images=1",
         "stage1.model=no-such-org/no-such-model"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip


def test_console_shows_own_lines_and_the_log_file_gets_everything(tmp_path):
    run = _prepare(tmp_path)
    assert run.returncode == 0, run.stderr
    (log_file,) = (tmp_path / "work" / "logs").glob("prepare-*.log")
    assert run.stdout == ""
    assert run.stderr.splitlines()[-1] == f"log: {log_file}"
    assert "manifest reasonseg/val: 1 rows, 0 skipped" in run.stderr
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr  # plain lines when not a terminal
    assert re.search(r"^demo train: 2/2 image done \(\d+s", run.stderr, re.M)
    logged = log_file.read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO llavaseg.pipeline: manifest reasonseg/val: 1 rows", logged, re.M)

    quiet = _prepare(tmp_path / "q", "-q")
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert [line for line in quiet.stderr.splitlines() if not line.startswith("log: ")] == []

    verbose = _prepare(tmp_path / "v", "-v")
    assert verbose.returncode == 0
    assert not (tmp_path / "v" / "work" / "logs").exists()  # -v: everything on the console, nothing redirected
    assert re.search(r"^[\d:]+ INFO llavaseg.pipeline: manifest reasonseg/val: 1 rows", verbose.stderr, re.M)
