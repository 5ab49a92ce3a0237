"""The CLI's argument conventions (no Ray)."""

import pytest

from ralm.cli import build_parser, main


def test_every_stage_has_a_command():
    from ralm.pipeline import STAGES

    parser = build_parser()
    for name in STAGES:
        argv = ["corpus", "build"] if name == "corpus" else [name]
        args = parser.parse_args([*argv, "--config", "demo"])
        assert args.config == "demo"


def test_overrides_after_options_are_kept(capsys):
    assert main(["config", "--run-dir", "/tmp/x", "train.lr=0.5", "--config", "demo", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "epochs: 3" in out


def test_stray_arguments_are_refused(capsys):
    assert main(["config", "not-an-override"]) == 2
    assert "not key.path=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "--run-dir", "x", "--bogus-flag"])


def test_config_errors_exit_2(capsys):
    assert main(["config", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_unknown_stage_in_run(capsys):
    assert main(["run", "--stages", "corpus,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_missing_recipe_root_is_a_clear_error(tmp_path, capsys):
    """Found when the config loads (exit 2, like any invalid config), before Ray starts."""
    rc = main(["corpus", "build", "--run-dir", str(tmp_path), "corpus.recipes=[{name: esc50}]"])
    assert rc == 2 and "corpus.recipes.0: Value error, recipe 'esc50' needs a root folder" in capsys.readouterr().err


def _probe_stage(cfg, run_dir):  # a stage that reports the run dir it was given
    return run_dir


def test_relative_run_dirs_reach_stages_absolute(tmp_path, monkeypatch):
    """Ray workers do not run in the driver's working directory: a relative run dir (the demo's
    `runs/demo`) must reach every stage, and through it every worker, as an absolute path."""
    from ralm import pipeline, storage
    from ralm.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(pipeline.STAGES, "probe", pipeline.Stage("probe", "tests.unit.test_cli:_probe_stage", ""))
    cfg = load_config("demo")
    assert cfg.storage.run_dir == "runs/demo"
    assert pipeline.run_stage("probe", cfg) == str(tmp_path / "runs" / "demo")
    assert pipeline.run_stage("probe", cfg, "other/dir") == str(tmp_path / "other" / "dir")
    assert storage.absolute("s3://bucket/run") == "s3://bucket/run"


def test_chat_and_serve_before_training_say_what_to_run(tmp_path, capsys):
    import ray

    ray_was_up = ray.is_initialized()
    for argv in (["chat", "hello"], ["serve"]):
        assert main([*argv, "--config", "demo", "--run-dir", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert f"ralm {argv[0]}: error: no exported adapter in" in err and "ralm train" in err
        assert "Traceback" not in err
    assert ray.is_initialized() == ray_was_up  # serve refused before starting Ray or deploying anything


def test_submitted_jobs_carry_redo():
    from ralm.submit import build_entrypoint

    run = build_entrypoint("run", "configs/demo.yaml", None, ["train.lr=0.1"], redo="train,eval")
    assert run.endswith("run --config configs/demo.yaml --redo train,eval train.lr=0.1")
    stage = build_entrypoint("corpus", "configs/demo.yaml", "/runs/x", [], redo="corpus")
    assert stage.endswith("corpus build --config configs/demo.yaml --run-dir /runs/x --redo")
    assert "--redo" not in build_entrypoint("train", "configs/demo.yaml", None, [])
    # what the job runs parses back: the entrypoint's arguments are the CLI's
    from ralm.cli import build_parser

    args = build_parser().parse_args(run.split()[2:])
    assert args.redo == "train,eval" and args.overrides == ["train.lr=0.1"]
    assert build_parser().parse_args(stage.split()[2:]).redo is True


def test_chat_wants_one_quoted_question(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--config", "demo", "train.lr=0.1", "what", "is", "this"])
    assert "chat takes one question, in quotes" in capsys.readouterr().err
