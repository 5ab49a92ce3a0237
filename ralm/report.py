"""The run report: `DIR/report.md` + PNG plots from every stage's report.json, rejects and timings.

Each section is drawn only when its stage has run, so the report is useful after any prefix of the
pipeline (and after a crash). Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any

from ralm import records, storage
from ralm.eval.significance import describe_vs_control
from ralm.pipeline import ORDER


def _read(uri: str) -> dict[str, Any] | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def collect(run_dir: str) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written as `DIR/report.json`)."""
    data: dict[str, Any] = {"run_dir": run_dir, "stages": {}}
    for stage in ORDER:
        uri = storage.join(run_dir, stage)
        rep = _read(storage.join(uri, "report.json"))
        rejects = Counter(r["reason"] for r in records.read_rejects(uri)) if storage.exists(uri) else Counter()
        if rep is not None or rejects:
            data["stages"][stage] = {"report": rep or {}, "rejects": dict(rejects.most_common()),
                                     "complete": records.is_complete(uri)}
    data["timings"] = _read(storage.join(run_dir, "timings.json")) or {}
    return data


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * float(x):.1f}%"


def _num(x: Any) -> str:
    return "—" if x is None else f"{float(x):.3g}"


def _gaps(vs: dict[str, Any]) -> str:
    """The eval's paired gap to each control with its uncertainty (reports before it had none: "")."""
    return "".join(f" Real minus {name} audio: {describe_vs_control(c)}." for name, c in vs.items())


PLOTS = {"corpus_by_domain.png", "rejects.png", "leak_rate.png", "train_loss.png", "eval_accuracy.png",
         "wall_time.png"}


def _plots(data: dict[str, Any], out_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    st = data["stages"]

    def save(fig: Any, name: str) -> None:
        assert name in PLOTS, name
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path

    clips = st.get("corpus", {}).get("report", {}).get("clips")
    if clips:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        domains = list(clips)
        splits = sorted({s for c in clips.values() for s in c})
        bottom = [0] * len(domains)
        for split in splits:
            vals = [clips[d].get(split, 0) for d in domains]
            ax.bar(domains, vals, bottom=bottom, label=split)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("clips")
        ax.set_title("Corpus by domain and split")
        ax.legend()
        save(fig, "corpus_by_domain.png")

    rej = {(s, r): n for s, v in st.items() for r, n in v["rejects"].items()}
    if rej:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rej) + 1.2))
        labels = [f"{s}: {r}" for s, r in rej]
        ax.barh(labels, list(rej.values()), color="tab:red")
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        ax.set_title("Rejects by stage and reason")
        save(fig, "rejects.png")

    reph = st.get("rephrase", {}).get("report", {})
    if "leak_rate_generated_same_records" in reph:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        vals = [reph.get("leak_rate_generated_inputs") or 0, reph["leak_rate_generated_same_records"] or 0,
                reph["leak_rate_rephrased_same_records"] or 0]
        ax.bar(["all self-generated", "survivors before", "survivors after"], [100 * v for v in vals],
               color=["tab:red", "tab:orange", "tab:green"])
        ax.set_ylabel("% of targets with a text leak")
        ax.set_title("Leak rate before / after rephrasing")
        save(fig, "leak_rate.png")

    curve = st.get("train", {}).get("report", {}).get("loss_curve")
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([p[0] for p in curve], [p[1] for p in curve])
        ax.set_xlabel("step")
        ax.set_ylabel("loss (response tokens)")
        ax.set_title("Training loss")
        save(fig, "train_loss.png")

    ev = st.get("eval", {}).get("report", {})
    if ev.get("overall") is not None:
        conds = ev.get("conditions", {})
        groups = ["overall"] + sorted(ev.get("by_domain", {}))
        series = {"audio": ev} | {c: conds.get(c, {}) for c in ev.get("controls", {})}
        fig, ax = plt.subplots(figsize=(7, 3.4))
        width = 0.8 / max(1, len(series))
        for i, (name, summ) in enumerate(series.items()):
            vals = [(summ.get("accuracy") if g == "overall" and name != "audio" else
                     ev["overall"] if g == "overall" else summ.get("by_domain", {}).get(g, {}).get("accuracy")) or 0
                    for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], [100 * v for v in vals], width,
                   label="real audio" if name == "audio" else f"{name} audio")
        ax.axhline(100 * (ev.get("chance") or 0), color="k", ls="--", lw=1, label="chance")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups)
        ax.set_ylabel("accuracy %")
        ax.set_title(f"Held-out {ev.get('benchmark', '')} accuracy vs controls")
        ax.legend(fontsize=8)
        save(fig, "eval_accuracy.png")

    if data["timings"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(data["timings"])
        ax.barh(names, [data["timings"][n] / 60 for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("minutes")
        ax.set_title("Wall time per stage")
        save(fig, "wall_time.png")
    return made


def render(data: dict[str, Any], images: dict[str, str]) -> str:
    st = data["stages"]
    out = [f"# ralm run report — `{data['run_dir']}`", ""]
    done = [s for s in ORDER if st.get(s, {}).get("complete")]
    out += [f"Stages complete: {', '.join(done) if done else 'none'}.", ""]

    def img(name: str, alt: str) -> None:
        if name in images:
            out.extend([f"![{alt}]({name})", ""])

    corpus = st.get("corpus", {}).get("report", {})
    if corpus:
        out += ["## Corpus", "", f"{corpus.get('records', 0)} clips, {60 * corpus.get('hours', 0):.1f} minutes of "
                f"audio; {corpus.get('rejects', 0)} rejected.", ""]
        out += ["| domain | clips |", "|---|---|"]
        out += [f"| {d} | {sum(c.values())} |" for d, c in corpus.get("clips", {}).items()]
        out.append("")
        img("corpus_by_domain.png", "corpus by domain")
    rejects = {s: v["rejects"] for s, v in st.items() if v["rejects"]}
    if rejects:
        out += ["## Rejects", "", "| stage | reason | rows |", "|---|---|---|"]
        out += [f"| {s} | {r} | {n} |" for s, rs in rejects.items() for r, n in rs.items()]
        out.append("")
        img("rejects.png", "rejects")
    gen = st.get("generate", {}).get("report", {})
    reph = st.get("rephrase", {}).get("report", {})
    if gen or reph:
        out += ["## Self-generated targets", ""]
        if gen:
            out += [f"- targets: {gen.get('rows')}; agreement with the clip's facts before best-of-N "
                    f"{_pct(gen.get('agreement_before_best_of_n'))}, after {_pct(gen.get('agreement_after_best_of_n'))}"
                    f"; metadata fallback {_pct(gen.get('metadata_fallback_rate'))}"]
        if reph:
            lr, er = reph.get("length_ratio") or {}, reph.get("word_edit_ratio") or {}
            nll = reph.get("nll") or {}
            out += [f"- leak rate: {_pct(reph.get('leak_rate_generated_inputs'))} of all self-generated targets; on the "
                    f"records that survived rephrasing, self-generated {_pct(reph.get('leak_rate_generated_same_records'))}"
                    f" -> rephrased {_pct(reph.get('leak_rate_rephrased_same_records'))}",
                    f"- rephrased/original length ratio: mean {_num(lr.get('mean'))}; word edit ratio: mean "
                    f"{_num(er.get('mean'))}",
                    f"- verified agreement of the final targets: {_pct(reph.get('target_agreement_rate'))}"]
            if nll.get("n"):
                out.append(f"- frozen LLM mean per-token NLL: original {nll.get('original_mean')}, rephrased "
                           f"{nll.get('rephrased_mean')} (n={nll['n']})")
        out.append("")
        img("leak_rate.png", "leak rate")
    tr = st.get("train", {}).get("report", {})
    if tr:
        out += ["## Training", "", f"{tr.get('steps')} steps on {tr.get('num_workers')} workers, "
                f"{tr.get('samples_per_s', 0):.1f} samples/s, loss {tr.get('first_loss', 0):.3f} -> "
                f"{tr.get('final_loss', 0):.3f}, padding {tr.get('padding_pct', 0):.1f}%.", ""]
        img("train_loss.png", "training loss")
    ev = st.get("eval", {}).get("report", {})
    if ev.get("overall") is not None:
        controls = ev.get("controls", {})
        out += ["## Evaluation", "", f"Held-out {ev.get('benchmark')}: {ev.get('items')} items. Accuracy "
                f"{_pct(ev['overall'])} with the real audio; "
                + ", ".join(f"{_pct(v)} with {k} audio" for k, v in controls.items())
                + f"; chance {_pct(ev.get('chance'))}; unparsed {_pct(ev.get('unparsed_rate'))}."
                + _gaps(ev.get("vs_controls") or {}), ""]
        if ev.get("by_domain"):
            out += ["| domain | accuracy | chance |", "|---|---|---|"]
            out += [f"| {d} | {_pct(v.get('accuracy'))} | {_pct(v.get('chance'))} |" for d, v in ev["by_domain"].items()]
            out.append("")
        img("eval_accuracy.png", "eval accuracy")
    if data["timings"]:
        total = sum(data["timings"].values())
        out += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
        out += [f"| {s} | {t:.0f} |" for s, t in data["timings"].items()] + [f"| total | {total:.0f} |", ""]
        img("wall_time.png", "wall time")
    return "\n".join(out)


def write_report(run_dir: str) -> str:
    """Write `DIR/report.md`, `DIR/report.json` and the plots; returns the report.md URI."""
    data = collect(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        images = _plots(data, tmp)
        for name, path in images.items():
            with open(path, "rb") as f:
                storage.write_bytes_atomic(storage.join(run_dir, name), f.read())
    for name in PLOTS - set(images):  # a plot of a stage since redone (or gone) would show old results
        storage.remove(storage.join(run_dir, name))
    storage.write_json(storage.join(run_dir, "report.json"), data)
    uri = storage.join(run_dir, "report.md")
    storage.write_text(uri, render(data, images))
    return uri
