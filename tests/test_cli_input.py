"""The command-line options of your own images: `manifest table` and `infer --input` parse, misuse is a usage error."""

from __future__ import annotations

from llavaseg import cli


def test_infer_input_options_parse():
    args = cli.parse_args(["infer", "--input", "t.csv", "--root", "photos", "--png", "png", "--replicas", "3",
                           "stage1.backend=openai", "--name", "mine"])  # fmt: skip
    assert (args.input, args.root, args.png, args.replicas, args.name) == ("t.csv", "photos", "png", 3, "mine")
    assert args.overrides == ["stage1.backend=openai"] and args.func.__name__ == "cmd_infer"


def test_manifest_table_options_parse():
    args = cli.parse_args(["manifest", "table", "--input", "photos/", "--query", "the cup?"])
    assert (args.dataset, args.input, args.query, args.split) == ("table", "photos/", "the cup?", None)


def test_options_of_input_without_input_are_a_usage_error(tmp_path, capfd):
    code = cli.main(["infer", "--png", str(tmp_path / "png"), f"paths.work_dir={tmp_path}"])
    assert code == 2
    assert "infer: --root, --query, --png and --name go with --input" in capfd.readouterr().err


def test_replicas_must_be_positive(tmp_path, capfd):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    code = cli.main(["infer", "--input", str(tmp_path / "t.csv"), "--checkpoint", str(checkpoint), "--replicas", "0",
                     f"paths.work_dir={tmp_path}"])  # fmt: skip
    assert code == 2 and "--replicas must be at least 1, got 0" in capfd.readouterr().err


def test_manifest_without_split_is_a_usage_error(tmp_path, capfd):
    assert cli.main(["manifest", "reasonseg", f"paths.work_dir={tmp_path}"]) == 2
    assert "manifest reasonseg: --split is required" in capfd.readouterr().err
