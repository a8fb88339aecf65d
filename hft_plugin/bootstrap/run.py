"""``hft-run``: run any command with HFT switched on in it and in every process it starts.

    hft-run --ratio 0.5 --round 2 -- deepspeed --module openrlhf.cli.train_sft ...
    hft-run --config hft.yaml -- llamafactory-cli train sft.yaml

It validates the options, exports ``HFT_ENABLE=1`` and one ``HFT_*`` variable per option given
(see :mod:`hft_plugin.bootstrap.env`), and replaces itself with the command. The installed start-up
hook then arms HFT in every Python interpreter the command starts (torchrun and deepspeed workers
included), as long as they run the interpreter hft-plugin is installed in.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from . import env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hft-run",
        description="Run COMMAND with Half Fine-Tuning switched on (exports HFT_ENABLE=1 and HFT_*).",
        usage="hft-run [options] -- COMMAND [ARGS ...]",
    )
    parser.add_argument("--ratio", type=str, help="trainable share of the layers, in (0, 1) [HFT_RATIO]")
    parser.add_argument("--strategy", type=str, help="category, layer, model or shielded [HFT_STRATEGY]")
    parser.add_argument("--scores", type=str, help="importance scores file for --strategy shielded [HFT_SCORES]")
    parser.add_argument("--round", type=str, help="fine-tuning round, 0, 1, 2, ... [HFT_ROUND]")
    parser.add_argument("--seed", type=str, help="seed of the draw [HFT_SEED]")
    embeddings = parser.add_mutually_exclusive_group()
    embeddings.add_argument("--train-embeddings", dest="train_embeddings", action="store_const", const="1",
                            help="train embeddings/lm_head/final norm (the default) [HFT_TRAIN_EMBEDDINGS]")
    embeddings.add_argument("--freeze-embeddings", dest="train_embeddings", action="store_const", const="0",
                            help="freeze them (the paper's ablation)")
    parser.add_argument("--config", type=str, help="YAML or JSON file with the same keys [HFT_CONFIG]")
    parser.add_argument("--disable-adapter", action="append", default=[], metavar="NAME",
                        help="do not activate this adapter (repeatable) [HFT_DISABLE_ADAPTERS]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    return parser


def build_environment(argv: list[str], environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Parse ``argv`` into (environment, command). Raises ConfigError on a bad value, before
    anything runs: a flag's value names the flag (``--ratio='abc' ...``), an inherited variable's
    names the variable, and the strategy must be one a plugin provides, as ``hft plan`` checks.

        >>> environ, command = build_environment(["--round", "2", "--", "echo", "hi"], {})
        >>> environ["HFT_ENABLE"], environ["HFT_ROUND"], command
        ('1', '2', ['echo', 'hi'])
    """
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    environ = dict(os.environ) if environ is None else dict(environ)
    environ[env.HFT_ENABLE] = "1"
    if args.config is not None:
        environ[env.HFT_CONFIG] = os.path.abspath(args.config)  # the command may change directory
    for field, variable in env.CONFIG_VARIABLES.items():
        value = getattr(args, field)
        if value is not None:
            flag = "--" + field.replace("_", "-")
            parsed = env.PARSERS[field](flag, value)  # the user typed the flag: name it, not the variable
            if field == "strategy":
                env.check_strategy(parsed, flag)
            environ[variable] = value
    if args.disable_adapter:
        names = env.disabled_adapters(environ) | {n.strip().lower() for n in args.disable_adapter}
        environ[env.HFT_DISABLE_ADAPTERS] = ",".join(sorted(names))
    env.load_config(environ)  # every value checked now, with the variable's name in the message
    return environ, command


def main(argv: list[str] | None = None) -> int:
    from ..errors import HFTError

    argv = sys.argv[1:] if argv is None else argv
    try:
        environ, command = build_environment(argv)
    except HFTError as exc:
        print(f"hft-run: {exc}", file=sys.stderr)
        return 2
    if not command:
        _parser().print_usage(sys.stderr)
        print("hft-run: no command given; put it after --, e.g. hft-run --round 1 -- trl sft ...", file=sys.stderr)
        return 2
    executable = shutil.which(command[0], path=environ.get("PATH"))
    if executable is None:
        print(f"hft-run: command not found: {command[0]}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(executable, command, environ)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
