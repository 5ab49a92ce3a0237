"""The run report draws what each finished stage reported, and only that."""

from ralm import records, storage
from ralm.report import write_report


def _stage(run, name, report, rejects=()):
    uri = storage.join(str(run), name)
    storage.write_json(storage.join(uri, "report.json"), report)
    if rejects:
        records.write_part(records.rejects_uri(uri), [records.reject(f"{name}{i}", name, r, "x")
                                                      for i, r in enumerate(rejects)], records.REJECT_SCHEMA)
    records.mark_success(uri)


def test_full_report_has_every_section_and_plot(tmp_path):
    _stage(tmp_path, "corpus", {"records": 12, "hours": 0.01, "rejects": 2,
                                "clips": {"speech": {"train": 5, "test": 1}, "sound": {"train": 6}}},
           ["corrupt", "silent"])
    _stage(tmp_path, "rephrase", {"leak_rate_generated_inputs": 0.6, "leak_rate_generated_same_records": 0.5, "leak_rate_rephrased_same_records": 0.05,
                                  "length_ratio": {"mean": 1.02}, "word_edit_ratio": {"mean": 0.2},
                                  "target_agreement_rate": 1.0}, ["unparseable"])
    _stage(tmp_path, "train", {"steps": 3, "num_workers": 2, "samples_per_s": 4.0, "first_loss": 3.0,
                               "final_loss": 1.0, "padding_pct": 5.0, "loss_curve": [[1, 3.0], [2, 2.0], [3, 1.0]]})
    _stage(tmp_path, "eval", {"benchmark": "demo", "items": 40, "overall": 0.8, "chance": 0.25,
                              "unparsed_rate": 0.0, "controls": {"shuffled": 0.3, "silence": 0.2},
                              "vs_controls": {"shuffled": {"delta": 0.5, "ci95": [0.3, 0.65], "mcnemar_p": 0.0004,
                                                           "audio_right_control_wrong": 22,
                                                           "audio_wrong_control_right": 2}},
                              "conditions": {"shuffled": {"accuracy": 0.3, "by_domain": {"speech": {"accuracy": 0.3}}},
                                             "silence": {"accuracy": 0.2}},
                              "by_domain": {"speech": {"accuracy": 0.9, "chance": 0.25}}})
    storage.write_json(storage.join(str(tmp_path), "timings.json"), {"corpus": 10.0, "train": 50.0})
    md = storage.read_bytes(write_report(str(tmp_path))).decode()
    for png in ("corpus_by_domain", "rejects", "leak_rate", "train_loss", "eval_accuracy", "wall_time"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in md
    assert "60.0% of all self-generated targets" in md and "self-generated 50.0% -> rephrased 5.0%" in md
    assert "Accuracy 80.0% with the real audio; 30.0% with shuffled audio, 20.0% with silence audio; chance 25.0%" in md
    assert ("Real minus shuffled audio: +50.0 points (95% CI +30.0 to +65.0; McNemar p < 0.001, 22 vs 2 "
            "discordant items) — significant at p < 0.05." in md)
    assert "| rephrase | unparseable | 1 |" in md and "| total | 60 |" in md
    assert "loss 3.000 -> 1.000" in md


def test_partial_run_report(tmp_path):
    _stage(tmp_path, "corpus", {"records": 1, "hours": 0.0, "rejects": 0, "clips": {"music": {"train": 1}}})
    md = storage.read_bytes(write_report(str(tmp_path))).decode()
    assert "Stages complete: corpus." in md and "## Training" not in md and "## Evaluation" not in md
    assert not (tmp_path / "train_loss.png").exists()


def test_a_redone_stage_leaves_no_old_plot_behind(tmp_path):
    _stage(tmp_path, "corpus", {"records": 1, "hours": 0.0, "rejects": 0, "clips": {"music": {"train": 1}}})
    _stage(tmp_path, "train", {"steps": 2, "num_workers": 1, "samples_per_s": 1.0, "first_loss": 2.0,
                               "final_loss": 1.0, "padding_pct": 0.0, "loss_curve": [[1, 2.0], [2, 1.0]]})
    write_report(str(tmp_path))
    assert (tmp_path / "train_loss.png").exists()
    storage.remove(storage.join(str(tmp_path), "train"), recursive=True)  # what `--redo train` does
    md = storage.read_bytes(write_report(str(tmp_path))).decode()
    assert not (tmp_path / "train_loss.png").exists() and "train_loss.png" not in md
    assert (tmp_path / "corpus_by_domain.png").exists()
