"""The ``r2ec`` command line: ``assets``, ``prepare``, ``eval``, ``compare``, ``train``, ``export``, ``recommend``.

Every command that takes ``--config`` also takes any number of ``key.path=value`` overrides, after one ``--set`` or
several (``--set a.b=1 c.d=2 --set e.f=3``). Errors in the
user's input (config, data files, missing assets) are printed as one line, ``r2ec: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set recpo.group_size=8 learner.lr=1e-4 (one flag or several)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2ec", description="R2ec / RecPO: RL post-training for reasoning "
                                     "recommenders")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("assets", help="fetch the offline assets (SmolLM2-135M-Instruct, MovieLens-100k) into the cache")

    p = sub.add_parser("prepare", help="build, cache and summarise the train/valid/test samples")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")

    p = sub.add_parser("eval", help="full-ranking evaluation of the zero-shot model, a baseline, or an exported "
                       "model (--checkpoint)")
    _add_config_args(p, required=False)
    p.add_argument("--split", choices=["valid", "test"], default=None, help="default: eval.split")
    p.add_argument("--baseline", choices=["popularity"], default=None, help="evaluate a baseline, not the model")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="evaluate the model exported to DIR by `r2ec export`, with its item table; without --config "
                        "the run's config stored in DIR is used and results go to DIR/eval")

    p = sub.add_parser("compare", help="evaluations of the same samples side by side: metrics with user-bootstrap "
                       "intervals, and each method minus the first with a paired interval")
    p.add_argument("evals", nargs="+", metavar="RUN",
                   help="a run folder (its eval_<split>.json) or an eval_<split>.json path; the first is the reference")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="for run folders (default test)")
    p.add_argument("--metrics", default=None, metavar="M,M",
                   help="e.g. ndcg@10,hit@10 (default: every hit@K / ndcg@K all of them report)")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="user-bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0, as eval.ci_seed)")
    p.add_argument("--labels", default=None, metavar="A,B", help="names in the table (default: the run folders')")
    p.add_argument("--json", dest="json_out", default=None, metavar="PATH", help="also write the table as JSON")

    p = sub.add_parser("train", help="distributed training on Ray (rollout workers + DeepSpeed learner): the "
                       "optional warm-up steps, then RecPO")
    _add_config_args(p)
    add_resume_arg(p)

    p = sub.add_parser("export", help="export a training checkpoint as a Hugging Face model folder with its item "
                       "table (loads with transformers and vLLM)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint folder (checkpoints/step-XXXXXXXX), or a run's output_dir or checkpoints/ "
                        "folder (its newest complete checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to create")
    p.add_argument("--keep-table", action="store_true",
                   help="copy the checkpoint's item table instead of re-encoding it with the exported weights "
                        "(always so for a run with model.item_table 'frozen')")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for re-encoding the items")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")

    p = sub.add_parser("recommend", help="recommend items for one user history with an exported model (JSON)")
    p.add_argument("--model", required=True, metavar="DIR", help="a folder written by `r2ec export`")
    p.add_argument("--history", required=True, nargs="+", type=_history_item, metavar="ITEM[:RATING[:UNIX_TS]]",
                   help="the user's items, oldest first; a missing timestamp means now")
    p.add_argument("-k", type=_positive_int, default=10, help="how many items to recommend (default 10)")
    p.add_argument("--max-new-tokens", type=_count, default=None,
                   help="reasoning length limit; 0 = no reasoning (default: the run's eval.max_new_tokens)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    p = sub.add_parser("timeline", help="a Gantt chart (PNG) of every actor's phases over a run's last steps, and "
                       "how busy each actor was (from RUN_DIR/timeline.jsonl)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir")
    p.add_argument("--steps", type=_positive_int, default=3, help="how many of the last steps to draw (default 3)")
    p.add_argument("--out", metavar="PNG", default=None, help="where to write the chart (default RUN_DIR/timeline.png)")
    return parser


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the newest complete checkpoint of run.output_dir if there is "
                        "one; none: start fresh (refused if the folder holds checkpoints); PATH: that checkpoint")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _history_item(text: str):
    import time

    from r2ec.recommend import parse_history_item

    try:
        return parse_history_item(text, time.time())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_guarded(command) -> int:
    """Run a command; errors in the user's input or cluster become one line on stderr and exit code 2."""
    from driver.remote import ClusterError
    from r2ec.assets import AssetError
    from r2ec.checkpoint import CheckpointError
    from r2ec.compare import CompareError
    from r2ec.config import ConfigError
    from r2ec.data.errors import DataError

    _quiet_libraries()
    try:
        return command()
    except (ConfigError, DataError, AssetError, ClusterError, CheckpointError, CompareError) as e:
        print(f"r2ec: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_guarded(lambda: _run(args))


def _run(args) -> int:
    from r2ec.config import ConfigError, load_config

    if args.command == "assets":
        from r2ec.assets import prepare_all

        for name, path in prepare_all().items():
            print(f"{name}: {path}")
        return 0
    if args.command == "compare":
        from r2ec.compare import compare_command

        return compare_command(args.evals, args.split, args.json_out, args.metrics, args.resamples, args.seed,
                               args.labels)
    if args.command == "train":
        return _train_command(args.config, args.overrides, args.resume)
    if args.command == "timeline":
        from driver.timeline import timeline_command

        return timeline_command(args.run_dir, args.steps, args.out)
    if args.command in ("export", "recommend") or getattr(args, "checkpoint", None):
        return _model_command(args)
    if args.command == "eval" and args.config is None:
        raise ConfigError("eval needs --config (or --checkpoint DIR to evaluate an exported model)")
    cfg = load_config(args.config, args.overrides)
    if args.command == "prepare":
        from r2ec.data.prepare import format_summary, prepare_from_config

        prepared = prepare_from_config(cfg.data, force=args.force)
        print(format_summary(prepared.summary))
        return 0
    if args.command == "eval":
        from r2ec.evaluate import evaluate

        result = evaluate(cfg, split=args.split, baseline=args.baseline)
        print(json.dumps(result, indent=2))
        print(f"wrote {cfg.run.output_dir}/eval_{result['split']}.json")
        return 0
    return 1


def _model_command(args) -> int:
    """``export``, ``recommend`` and ``eval --checkpoint``: unusable checkpoints or exported folders and unknown
    history items are reported as one line too."""
    from r2ec.bundle import ExportError
    from r2ec.checkpoint import CheckpointError
    from r2ec.recommend import UnknownItemsError

    try:
        if args.command == "export":
            from r2ec.export import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.out, reencode_items=False if args.keep_table else None,
                                    device=args.device, overwrite=args.force)
            print(f"wrote {out}")
            return 0
        if args.command == "recommend":
            from r2ec.recommend import recommend_command

            return recommend_command(args.model, args.history, args.k, args.max_new_tokens, args.device)
        return _eval_export(args)
    except (CheckpointError, ExportError, UnknownItemsError) as e:
        print(f"r2ec: error: {e}", file=sys.stderr)
        return 2


def _eval_export(args) -> int:
    from pathlib import Path

    from r2ec.bundle import EXPORT_CONFIG, export_run_config, read_export_meta
    from r2ec.config import ConfigError, load_config
    from r2ec.evaluate import evaluate_export

    if args.baseline:
        raise ConfigError("eval: --baseline and --checkpoint exclude each other")
    read_export_meta(args.checkpoint)  # a clear error before anything else when DIR is not an export
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        stored = export_run_config(args.checkpoint)
        stored.setdefault("run", {})["output_dir"] = str(Path(args.checkpoint) / "eval")
        cfg = load_config(Path(args.checkpoint) / EXPORT_CONFIG, args.overrides, data=stored)
    result = evaluate_export(cfg, args.checkpoint, split=args.split)
    print(json.dumps(result, indent=2))
    print(f"wrote {cfg.run.output_dir}/eval_{result['split']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _train_command(config: str, overrides: list[str], resume: str = "auto") -> int:
    from driver.loop import train
    from r2ec.config import load_config

    cfg = load_config(config, overrides)
    result = train(cfg, resume=resume)  # its log lines already gave the last validation and the test metrics
    print(f"wrote {cfg.run.output_dir}/metrics.jsonl, eval_valid.json and eval_test.json (the metrics with their "
          "95% intervals)")
    if result["valid_gain"]:
        print(result["valid_gain"])
    return 0
