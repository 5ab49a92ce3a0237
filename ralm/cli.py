"""`ralm <stage> --config FILE [--run-dir DIR] [key=value ...]`, `ralm run`, `ralm config`.

Every stage command follows one convention: the config (a path or a name under configs/), optional
run dir (default: `storage.run_dir` of the config), then `a.b.c=value` overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence

from ralm.config import ConfigError, RalmConfig, dump_config, load_config
from ralm.storage import StorageError

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")  # key.path=value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="demo", help="config file or name under configs/ (default: demo)")
    p.add_argument("--run-dir", default=None, help="where stage outputs go (default: storage.run_dir)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def _redo_flag(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--redo", action="store_true",
                   help="delete this stage's outputs (and those of the stages built on it) first, then run it")


def build_parser() -> argparse.ArgumentParser:
    from ralm.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="ralm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="build the corpus dataset")
    corpus_sub = corpus.add_subparsers(dest="action", required=True)
    _redo_flag(corpus_sub.add_parser("build", help=STAGES["corpus"].help))

    for name, stage in STAGES.items():
        if name not in ("corpus", "eval"):
            _redo_flag(sub.add_parser(name, help=stage.help))

    ev = sub.add_parser("eval", help=STAGES["eval"].help)
    ev.add_argument("--benchmark", default=None, help="demo | mmau | mmsu | mmar | mcq (any file, its "
                    "columns mapped by eval.fields.*; default: eval.benchmark)")
    ev.add_argument("--data", default=None, help="benchmark file (MMAU json, MMSU/MMAR jsonl; mcq: json, "
                    "jsonl, csv, tsv, parquet)")
    ev.add_argument("--audio-root", default=None, help="folder the benchmark's audio paths are relative to")
    _common(ev)

    chat = sub.add_parser("chat", help="ask the trained ALM about one audio file (no question: a conversation, "
                                       "one question per line of input)")
    chat.add_argument("--audio", default=None, help="wav/flac/ogg/mp3 file (omit for a text-only question)")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--system", default=None, help="a system turn (the adapter was trained without one)")
    chat.add_argument("question", nargs="?", default=None,
                      help="the question, in quotes; omitted: ask on standard input, follow-ups keep the clip")
    _common(chat)

    srv = sub.add_parser("serve", help="serve the trained ALM: OpenAI-compatible /v1/chat/completions")
    _common(srv)

    run = sub.add_parser("run", help="every stage in order, skipping finished ones")
    _common(run)
    run.add_argument("--stages", default=None, help="comma-separated subset, e.g. corpus,features")
    run.add_argument("--redo", default=None, metavar="STAGES",
                     help="comma-separated stages to start over, with every stage built on them (e.g. train: "
                     "train and eval); needed after changing a finished stage's settings")

    rep = sub.add_parser("report", help="(re)write DIR/report.md and its plots from the stages' reports")
    _common(rep)

    cfg = sub.add_parser("config", help="print the fully resolved config")
    _common(cfg)

    submit = sub.add_parser("submit", help="run a stage or the whole pipeline as a Ray job")
    submit.add_argument("target", choices=[*STAGES, "run"], help="a stage name or 'run'")
    submit.add_argument("--address", default=os.environ.get("RAY_JOB_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray dashboard/job address (default $RAY_JOB_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--runtime-env", default=None, help="runtime env YAML (default jobs/runtime_env.yaml)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--submission-id", default=None)
    submit.add_argument("--redo", default=None, metavar="STAGES",
                        help="start stages over first, as `ralm run --redo` (a stage target: any value redoes it)")
    _common(submit)

    plan = sub.add_parser("plan", help="projected GPU-hours, storage and tokens for a corpus size")
    plan.add_argument("--hours", type=float, required=True, help="hours of audio")
    plan.add_argument("--instances", type=int, default=None,
                      help="training instances, i.e. (prompt, target) pairs, not machines (default: the paper's "
                      "~322 per audio hour)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`--run-dir D k=v`): argparse leaves those as extras; keep them.
    args, extras = parser.parse_known_args(argv)
    if args.command == "chat":  # overrides may come before the question: argparse takes the first for it
        words = [*filter(None, [args.question]), *args.overrides, *(x for x in extras if not x.startswith("-"))]
        extras = [x for x in extras if x.startswith("-")]
        args.overrides = [w for w in words if _OVERRIDE.match(w)]
        question = [w for w in words if not _OVERRIDE.match(w)]
        if len(question) > 1:
            parser.error(f"chat takes one question, in quotes (got {question})")
        args.question = question[0] if question else None
    stray = [x for x in extras if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = [*getattr(args, "overrides", []), *extras]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ralm: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or cfg.storage.run_dir
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command != "submit":  # a job resolves its run dir in its own working dir
        from ralm import storage

        run_dir = storage.absolute(run_dir)  # chat/serve/report too; stages get it from pipeline
    if args.command == "eval":
        extra = [f"eval.{key}={getattr(args, key)}" for key in ("benchmark", "data", "audio_root")
                 if getattr(args, key)]
        if extra:
            try:
                cfg = load_config(args.config, [*args.overrides, *extra])
            except ConfigError as e:
                print(f"ralm: {e}", file=sys.stderr)
                return 2
    try:
        return _run_command(args, cfg, run_dir)
    except (ConfigError, FileNotFoundError, StorageError, RuntimeError, ValueError, KeyError) as e:
        if args.verbose:
            logging.getLogger("ralm").exception("ralm %s failed", args.command)
        print(f"ralm {args.command}: error: {e}", file=sys.stderr)
        return 1


def _chat(args: argparse.Namespace, cfg: RalmConfig, run_dir: str) -> int:
    """One answer, or (no question given) a conversation about the clip read from standard input."""
    from ralm.eval.inference import chat_engine, converse

    def show(text: str) -> None:  # the answer as it is generated
        print(text, end="", flush=True)

    interactive = args.question is None and sys.stdin.isatty()

    def questions() -> Iterator[str]:
        if args.question is not None:
            yield args.question
            return
        if interactive:
            print("Ask about the clip; follow-up questions keep it and the answers before. Ctrl-D ends.",
                  file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                return
            if line.strip():
                yield line.strip()

    engine = chat_engine(cfg, run_dir)
    try:
        for _ in converse(engine, args.audio, questions(), args.max_new_tokens or cfg.eval.serve.max_new_tokens,
                          system=args.system, on_text=show):
            print(flush=True)
    finally:
        engine.close()
    return 0


def _run_command(args: argparse.Namespace, cfg: RalmConfig, run_dir: str) -> int:
    from ralm import pipeline

    if args.command == "chat":
        return _chat(args, cfg, run_dir)
    if args.command == "serve":
        import time

        from ralm.serve.alm_app import serve_alm

        svc = serve_alm(cfg, run_dir)
        print(f"serving the ALM at {svc.url} as model {svc.model!r} (OpenAI-compatible; Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    if args.command == "report":
        from ralm.report import write_report

        print(write_report(run_dir))
        return 0
    if args.command == "plan":
        from ralm import plan

        estimate = plan.estimate(cfg, hours=args.hours, instances=args.instances)
        print(plan.render_json(estimate) if args.json else plan.render_table(estimate))
        return 0
    if args.command == "submit":
        from ralm.submit import submit

        _, status = submit(args.target, args.address, args.config, args.run_dir, args.overrides,
                           runtime_env=args.runtime_env, follow=args.follow, submission_id=args.submission_id,
                           redo=args.redo)
        return 0 if status in (None, "SUCCEEDED") else 1
    if args.command == "run":
        stages = args.stages.split(",") if args.stages else None
        redo = args.redo.split(",") if args.redo else None
        unknown = [s for s in [*(stages or []), *(redo or [])] if s not in pipeline.STAGES]
        if unknown:
            print(f"ralm: unknown stage(s) {unknown}; stages: {list(pipeline.STAGES)}", file=sys.stderr)
            return 2
        pipeline.run_all(cfg, run_dir, stages, redo)
        print(f"run complete: {run_dir}")
        return 0
    stage = "corpus" if args.command == "corpus" else args.command
    uri = pipeline.run_stage(stage, cfg, run_dir, redo_first=bool(getattr(args, "redo", False)))
    _print_report(uri)
    return 0


def _print_report(stage_uri: str) -> None:
    from ralm import storage

    md = storage.join(stage_uri, "report.md")
    if storage.exists(md):
        print(storage.read_bytes(md).decode())
    print(f"output: {stage_uri}")


if __name__ == "__main__":
    sys.exit(main())
