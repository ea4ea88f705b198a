"""The ``r2ec`` command line: ``assets``, ``prepare``, ``eval``, ``train``.

Every command that takes ``--config`` also takes any number of ``--set key.path=value`` overrides. Errors in the
user's input (config, data files, missing assets) are printed as one line, ``r2ec: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set recpo.group_size=8 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2ec", description="R2ec / RecPO: RL post-training for reasoning "
                                     "recommenders")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("assets", help="fetch the offline assets (SmolLM2-135M-Instruct, MovieLens-100k) into the cache")

    p = sub.add_parser("prepare", help="build, cache and summarise the train/valid/test samples")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a cached copy exists")

    p = sub.add_parser("eval", help="full-ranking evaluation of the zero-shot model or a baseline")
    _add_config_args(p)
    p.add_argument("--split", choices=["valid", "test"], default=None, help="default: eval.split")
    p.add_argument("--baseline", choices=["popularity"], default=None, help="evaluate a baseline, not the model")

    p = sub.add_parser("train", help="distributed RecPO training on Ray (rollout workers + DeepSpeed learner)")
    _add_config_args(p)
    add_resume_arg(p)
    return parser


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the newest complete checkpoint of run.output_dir if there is "
                        "one; none: start fresh (refused if the folder holds checkpoints); PATH: that checkpoint")


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
    from r2ec.assets import AssetError
    from r2ec.checkpoint import CheckpointError
    from r2ec.config import ConfigError
    from r2ec.data.errors import DataError
    from r2ec.driver import ClusterError

    _quiet_libraries()
    try:
        return command()
    except (ConfigError, DataError, AssetError, ClusterError, CheckpointError) as e:
        print(f"r2ec: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_guarded(lambda: _run(args))


def _run(args) -> int:
    from r2ec.config import load_config

    if args.command == "assets":
        from r2ec.assets import prepare_all

        for name, path in prepare_all().items():
            print(f"{name}: {path}")
        return 0
    if args.command == "train":
        from r2ec.train import _train_command

        return _train_command(args.config, args.overrides, args.resume)
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


if __name__ == "__main__":
    sys.exit(main())
