"""The ``hft`` command: see which half trains, reset a tuned half, run a trainer with HFT on.

    hft plan MODEL [--round N|next | --rounds 0-3] [--strategy S [--scores FILE]] [--ratio R] [--seed N]
                   [--train-embeddings | --freeze-embeddings] [--plot FILE.png]
                   [--format table|json|axolotl|spectrum [--expressible-only]]
    hft half-reset ...          (see ``hft half-reset --help``)
    hft verify BASE TUNED [--manifest FILE] [--format table|json]
    hft forgetting BASE TUNED [--texts FILE] [--samples N]   (see ``hft forgetting --help``)
    hft run [options] -- COMMAND ...   (the same as ``hft-run``)

``hft plan`` reads only the model's config (a local folder, a config.json, a .gguf file's metadata,
or a Hub model id through the Hugging Face cache) and builds the model on the meta device: no
weights are read, so it is instant even for a 70B model. Every error says what to do, on stderr with
exit code 2: one line, except an export that cannot express some tensors (one line per tensor).

Example:
    >>> import json, os, tempfile
    >>> from hft_plugin.testing import tiny_config
    >>> folder = tempfile.mkdtemp()
    >>> tiny_config("llama").save_pretrained(folder)
    >>> main(["plan", folder, "--round", "1"])  # doctest: +ELLIPSIS
    model: LlamaForCausalLM ...
    0
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Callable, Sequence

from .parsing import flag_type, parse_int, parse_path, parse_ratio, parse_round

PROG = "hft"


class CommandError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# -- hft plan ----------------------------------------------------------------------------------------

_SOURCES = "a local model folder, a config.json, a .gguf file, or a Hub model id such as Qwen/Qwen3-8B"


def load_config(source: str) -> Any:
    """The transformers config of ``source``, reading nothing but the config.

    ``source`` is a local folder (its config.json, or else its one .gguf file), a config.json, a
    .gguf file (the config is read from its metadata by transformers' GGUF support), or a Hub model
    id (``AutoConfig.from_pretrained``: config.json only, through the Hugging Face cache, offline
    when ``HF_HUB_OFFLINE=1``). Raises CommandError with the fix when it cannot.
    """
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return _json_config(os.path.join(source, "config.json"))
        ggufs = sorted(glob.glob(os.path.join(glob.escape(source), "*.gguf")))
        if len(ggufs) == 1:
            return _gguf_config(ggufs[0])
        if ggufs:
            names = ", ".join(os.path.basename(g) for g in ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
            raise CommandError(f"{source} has no config.json and {len(ggufs)} .gguf files ({names}); pass one of "
                               f"them, e.g. hft plan {ggufs[0]}")
        raise CommandError(f"{source} has no config.json and no .gguf file; pass {_SOURCES}")
    if os.path.isfile(source):
        try:
            with open(source, "rb") as f:
                magic = f.read(4)
        except OSError as error:
            raise CommandError(f"cannot read {source} ({error.strerror or error})") from None
        return _gguf_config(source) if magic == b"GGUF" else _json_config(source)
    if _is_hub_id(source):
        return _hub_config(source)
    raise CommandError(f"no such file or directory: {source}; pass {_SOURCES}")


def _json_config(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise CommandError(f"{file} is neither a JSON model config nor a GGUF file; pass a config.json, a .gguf "
                           "file, a model folder or a Hub model id") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CommandError(f"{file} is not a readable JSON model config ({error}); pass a model's config.json, "
                           "its folder, a .gguf file or a Hub model id") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise CommandError(f"{file} has no \"model_type\", so it is not a transformers model config; pass a model's "
                           "config.json, its folder, a .gguf file or a Hub model id")
    from transformers import CONFIG_MAPPING, __version__ as transformers_version

    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING:
        hint = " (it names custom code in auto_map, which hft plan does not run)" if "auto_map" in data else ""
        raise CommandError(
            f"unknown model type {model_type!r} in {file}{hint}: transformers {transformers_version} does not know it; "
            "upgrade transformers or register a layout for it"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as error:  # a config class rejects its own values: say which file
        raise CommandError(f"cannot read {file} as a {model_type} config: {_first_line(error)}") from None


def _gguf_config(file: str) -> Any:
    """The config transformers' GGUF loader reads from the file's metadata (no tensor is loaded)."""
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        raise CommandError(f"reading the config of {file} needs the gguf package: pip install gguf "
                           "(or pass the model's config.json)") from None
    from transformers import AutoConfig, __version__ as transformers_version

    folder, name = os.path.split(os.path.abspath(file))
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as error:  # an architecture transformers' GGUF support does not map, a damaged file
        raise CommandError(f"transformers {transformers_version} cannot read a model config from {file} "
                           f"({_first_line(error)}); pass the model's config.json instead") from None


def _is_hub_id(source: str) -> bool:
    if source.startswith((".", "/", "~")) or source.endswith((".json", ".gguf")) or os.sep != "/" and os.sep in source:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(source)
    except Exception:
        return False
    return True


def _hub_config(repo_id: str) -> Any:
    """The config of a Hub model through transformers' own loading and the Hugging Face cache."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(repo_id)
    except Exception as error:
        raise CommandError(_hub_error(repo_id, error)) from None


def _hub_error(repo_id: str, error: BaseException) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    local = "or pass a local folder, config.json or .gguf file"
    download = f"{_download_command()} {repo_id} config.json"
    if any(isinstance(c, GatedRepoError) for c in causes):
        return (f"{repo_id} is a gated model on the Hub: accept its terms on its Hub page, log in with "
                f"`hf auth login` (or set HF_TOKEN), then run again; {local}")
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return (f"{repo_id} is not a local path and was not found on the Hub: check the id (private models "
                f"need `hf auth login` or HF_TOKEN), {local}")
    if any(isinstance(c, LocalEntryNotFoundError) for c in causes):
        if constants.HF_HUB_OFFLINE:
            return (f"{repo_id} is not a local path and its config is not in the Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it: run `{download}`, "
                    f"or set HF_HUB_OFFLINE=0, {local}")
        return (f"{repo_id} is not a local path, its config is not in the Hugging Face cache, and the Hub "
                f"({constants.ENDPOINT}) cannot be reached: run `{download}` where it can (or set HF_ENDPOINT to a "
                f"mirror), {local}")
    return f"cannot read the config of {repo_id} from the Hub ({_first_line(error)}); {local}"


def _download_command() -> str:
    """``hf download`` from huggingface_hub 1.0 on; ``huggingface-cli download`` before."""
    try:
        from huggingface_hub import __version__ as hub_version
        from packaging.version import Version

        return "hf download" if Version(hub_version) >= Version("1.0") else "huggingface-cli download"
    except Exception:
        return "hf download"


def build_meta_model(config: Any):
    """The model of ``config`` on the meta device: shapes only, no memory, no weights read."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (an encoder, a vision-language wrapper...): its base model
            try:
                return AutoModel.from_config(config)
            except Exception as error:
                raise CommandError(f"cannot build a {config.model_type} model: {_first_line(error)}") from None
        except Exception as error:
            raise CommandError(f"cannot build a {config.model_type} model: {_first_line(error)}") from None


def parse_rounds(text: str) -> list[int]:
    """``"0-3"`` -> [0, 1, 2, 3]; ``"0,2,5"`` -> [0, 2, 5]; ``"4"`` -> [4]."""
    rounds: list[int] = []
    try:
        for piece in text.split(","):
            first, dash, last = piece.strip().partition("-")
            start, stop = int(first), int(last) if dash else int(first)
            if start < 0 or stop < start:
                raise ValueError
            rounds.extend(range(start, stop + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of rounds; write e.g. 0-3 or 0,2,5") from None
    if len(rounds) > 16:
        raise argparse.ArgumentTypeError(f"{text!r} names {len(rounds)} rounds; at most 16 fit in one picture")
    return rounds


def run_plan(args: argparse.Namespace) -> int:
    from .config import HFTConfig
    from .report import layer_grid, plot_grids, render_table
    from .checks import check_model
    from .manifest import MANIFEST_NAME
    from .rounds import resolve_round, rounds_run
    from .selection import _select, strategy_names

    if args.strategy is not None and args.strategy not in strategy_names():
        raise CommandError(f"unknown strategy {args.strategy!r}; known: {', '.join(strategy_names())}")
    config = load_config(args.model)
    model = build_meta_model(config)
    # The folder the model would be loaded from, where round="next" reads the previous manifest.
    folder = args.model if os.path.isdir(args.model) else os.path.dirname(os.path.abspath(args.model))
    if os.path.exists(args.model):
        model.config._name_or_path = folder
    # Only the options given on the command line: with --round next the others are the previous
    # round's, from the folder's hft_selection.json (as round="next" does in training).
    options = {k: v for k in ("ratio", "strategy", "seed", "train_embeddings", "scores")
               if (v := getattr(args, k)) is not None}
    check_model(model)
    selections = []
    for r in args.rounds or [args.round]:
        # select_half's warning that a round which already ran "trains the same half" is for training;
        # a plan trains nothing, so it says which rounds ran instead (below)
        resolved, history = resolve_round(model, HFTConfig.from_dict({**options, "round": r}), warn=False)
        selections.append(_select(model, resolved, history))
    ran = rounds_run(selections[0].history)
    shown = [s.config.round for s in selections if s.config.round in ran]
    if shown:  # on stderr: stdout stays the table, JSON or YAML asked for
        print(f"note: {os.path.join(folder, MANIFEST_NAME)} says round {', '.join(map(str, shown))} already ran on "
              f"these weights (rounds run: {', '.join(map(str, ran))}); the next round is {max(ran) + 1} "
              "(--round next).", file=sys.stderr)
    fmt = "json" if args.json else args.format
    if fmt in EXPORT_FORMATS:
        if len(selections) > 1:
            raise CommandError(f"--format {fmt} prints one round's selection; pass --round N instead of --rounds")
        print(_export_text(selections[0], fmt, args), end="")
    elif fmt == "json":
        payload = [s.to_dict() for s in selections]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=1))
    else:
        total = sum(p.numel() for p in model.parameters())
        print(f"model: {type(model).__name__} from {args.model} ({total:,} parameters; meta device, no weights read)")
        for selection in selections:
            print()
            print(render_table(layer_grid(selection)))
            print()
            print(selection.summary())
    if args.plot:
        title = f"{type(model).__name__} ({os.path.basename(os.path.normpath(args.model))})"
        try:
            plot_grids([layer_grid(s) for s in selections], args.plot, title=title)
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib (or hft-plugin[bench])") from None
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot write the plot {args.plot}: {_first_line(error)}") from None
        print(f"wrote {args.plot}", file=sys.stderr if fmt != "table" else sys.stdout)
    return 0


EXPORT_FORMATS = ("axolotl", "spectrum")


def _export_text(selection, fmt: str, args: argparse.Namespace) -> str:
    """The selection in Axolotl's or Spectrum's ``unfrozen_parameters`` YAML (see hft_plugin.export)."""
    from . import __version__
    from .export import ExportError, export

    c, s = selection.config, selection.stats()
    command = (f"hft plan {args.model} --round {c.round} --strategy {c.strategy}"
               f"{'' if c.scores is None else ' --scores ' + c.scores} --ratio {c.ratio:g} --seed {c.seed}"
               f"{'' if c.train_embeddings else ' --freeze-embeddings'} --format {fmt}")
    header = [
        f"Half Fine-Tuning, round {c.round}: {command} (hft-plugin {__version__})",
        f"{s['trainable_params']:,} of {s['total_params']:,} parameters train ({s['overall_ratio']:.2%}); of the "
        f"transformer layers' parameters {s['trainable_ratio']:.2%} (the HFT ratio); layout {selection.layout_name}, "
        f"fingerprint {selection.fingerprint}",
    ]
    result = export(selection, fmt)
    try:
        return result.render(header, expressible_only=args.expressible_only)
    except ExportError as error:
        raise CommandError(str(error)) from None


def _add_plan(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="show which half of a model trains (no weights read)",
        description="Build MODEL from its config on the meta device (no weights are read) and show, per "
                    "layer and unit, which half trains in a round, with the shares per role.",
        epilog="example: hft plan ./SmolLM2-135M --rounds 0-3 --plot rounds.png",
    )
    plan.add_argument("model", metavar="MODEL",
                      help="a local model folder (with a config.json or a .gguf file), a config.json, a .gguf file, "
                           "or a Hub model id (its config only, through the Hugging Face cache)")
    rounds = plan.add_mutually_exclusive_group()
    rounds.add_argument("--round", type=flag_type(parse_round, "--round"), default=0,
                        help="the fine-tuning round (default 0), or next: the round after the one in MODEL's "
                             "hft_selection.json, with its strategy, ratio and seed unless given here")
    rounds.add_argument("--rounds", type=parse_rounds, metavar="RANGE",
                        help="several rounds, e.g. 0-3 or 0,2,5: one table each, one picture side by side")
    plan.add_argument("--strategy", help="category (default, the paper's), layer, model, shielded (with --scores), "
                                         "or a plugin's")
    plan.add_argument("--scores", type=flag_type(parse_path, "--scores"), metavar="FILE",
                      help="the importance scores file --strategy shielded reads (written by "
                           "hft_plugin.importance.compute_scores); nothing is recomputed")
    plan.add_argument("--ratio", type=flag_type(parse_ratio, "--ratio"), help="trainable share of the layers' parameters (default 0.5)")
    plan.add_argument("--seed", type=flag_type(parse_int, "--seed"), help="seeds the draw (default 0)")
    embeddings = plan.add_mutually_exclusive_group()
    embeddings.add_argument("--train-embeddings", dest="train_embeddings", action="store_true", default=None,
                            help="train embeddings, lm_head and final norm (default, as the paper)")
    embeddings.add_argument("--freeze-embeddings", dest="train_embeddings", action="store_false",
                            help="freeze everything outside the transformer layers")
    plan.add_argument("--format", choices=("table", "json", *EXPORT_FORMATS), default="table",
                      help="table (default); json: the selection as hft_selection.json (a list for several rounds); "
                           "axolotl: Axolotl's unfrozen_parameters (anchored regexes, [start:end] row ranges); "
                           "spectrum: Spectrum's unfrozen_parameters YAML (whole tensors only)")
    plan.add_argument("--json", action="store_true", help="the same as --format json")
    plan.add_argument("--expressible-only", action="store_true",
                      help="with --format axolotl/spectrum: print what the format can express even when some tensors "
                           "cannot be (they are listed and stay frozen whole in that tool); without it, exit 2")
    plan.add_argument("--plot", metavar="FILE.png", help="also draw the map as a heatmap into this file")
    plan.set_defaults(func=run_plan)


# -- hft half-reset: the command here, the work in hft_plugin.reset (imported when it runs) ------------

def _half_reset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="the model the tuned one was fine-tuned from")
    parser.add_argument("--tuned", required=True, metavar="DIR", help="the fully fine-tuned model")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory for the result")
    parser.add_argument("--strategy", help="how the half is chosen (default: category, or the tuned run's)")
    parser.add_argument("--ratio", type=flag_type(parse_ratio, "--ratio"),
                        help="the share of the layers that keeps its tuned values (default: 0.5)")
    parser.add_argument("--seed", type=flag_type(parse_int, "--seed"), help="seeds the choice of the half (default: 0)")
    parser.add_argument("--round", type=flag_type(parse_int, "--round"),
                        help="the HFT round whose frozen half is reset (default: 0)")
    parser.add_argument("--reset-embeddings", action="store_const", const=True, default=None,
                        help="also reset embeddings, lm_head and final norm (by default they keep their tuned values)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .bin checkpoints (loaded with torch.load(weights_only=True))")
    parser.epilog = ("If TUNED has an hft_selection.json (it was trained with HFT), the options left out are that "
                     "run's, and an option that contradicts it is an error.")


def run_half_reset(args: argparse.Namespace) -> int:
    """Run ``hft half-reset`` with parsed arguments; returns the exit code (128 + the signal's
    number if a signal stopped it, with nothing written)."""
    from .reset import half_reset_checkpoint

    try:
        selection = half_reset_checkpoint(
            args.base, args.tuned, args.out, strategy=args.strategy, ratio=args.ratio, seed=args.seed,
            round=args.round, train_embeddings=None if args.reset_embeddings is None else not args.reset_embeddings,
            allow_pickle=args.allow_pickle, _flags=True,
        )
    except KeyboardInterrupt as stop:  # Interrupted (SIGTERM, SIGHUP) or Ctrl-C
        import signal

        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"half-reset: interrupted by {signal.Signals(signum).name}; nothing was written to {args.out}",
              file=sys.stderr)
        return 128 + int(signum)
    plan = selection.plan()
    print(selection.summary())
    print(f"reset to base: {len(plan.frozen)} tensors whole, {len(plan.partial)} in part; "
          f"wrote {os.path.abspath(args.out)}")
    return 0


def add_half_reset(subparsers) -> argparse.ArgumentParser:
    """Add ``half-reset`` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "half-reset", help="reset the frozen half of a tuned model to its base (the paper's Half-Reset)",
        description="Write OUT = TUNED with the half that HFT would freeze reset to BASE, tensor by tensor "
                    "over safetensors (memory stays near the largest tensor).",
    )
    _half_reset_arguments(parser)
    parser.set_defaults(func=run_half_reset)
    return parser


def half_reset_main(argv: Sequence[str] | None = None) -> int:
    """``python -m hft_plugin.reset``: the same as ``hft half-reset``."""
    from .errors import HFTError

    parser = argparse.ArgumentParser(prog="python -m hft_plugin.reset",
                                     description="Half-Reset a fully fine-tuned checkpoint to its base.")
    _half_reset_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_half_reset(args)
    except HFTError as error:
        print(f"half-reset: error: {_first_line(error)}", file=sys.stderr)
        return 2


# -- hft forgetting and hft run: their own modules, loaded only when used --------------------------------

_RUN_HELP = "run a training command with HFT on in every process (the same as hft-run)"


def _add_forgetting(subparsers, load: bool) -> None:
    if load:
        from .forgetting_cli import register_cli  # torch and transformers: only when the command runs

        register_cli(subparsers)
    else:
        subparsers.add_parser("forgetting", help="how far a tuned model moved from its base (KL, NLL change)",
                              add_help=False)


def _run(argv: Sequence[str]) -> int:
    try:
        from .bootstrap import run
    except ImportError as error:
        raise CommandError(f"hft run is not available in this installation ({_first_line(error)})") from None
    try:
        return run.main(list(argv))
    except SystemExit as done:  # its argparse: --help (0) or a usage error (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)


# -- hft verify: its own module (hft_plugin.verify), imported only when it runs ----------------------

def _add_verify(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify", help="check that a tuned checkpoint's frozen half is bit-identical to its base",
        description="Compare TUNED with BASE tensor by tensor (streaming over safetensors) against TUNED's "
                    "hft_selection.json: every frozen element must be bit-identical to the base; counts what "
                    "trained. Exit code 0 when the promise holds, 1 when a frozen element differs, 2 on bad input.",
        epilog="example: hft verify ./SmolLM2-135M ./out/checkpoint-500",
    )
    verify.add_argument("base", metavar="BASE", help="the weights the round started from: the base model's folder "
                                                     "for round 0, the previous round's output for a later round")
    verify.add_argument("tuned", metavar="TUNED", help="the folder the HFT run saved (with its hft_selection.json)")
    verify.add_argument("--manifest", metavar="FILE", help="judge by this hft_selection.json (default: TUNED's own)")
    verify.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (default): one row per tensor and the verdict; json: the same as an object")
    verify.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .bin checkpoints (loaded with torch.load(weights_only=True))")
    verify.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import run_cli

    return run_cli(args)


# -- the command -------------------------------------------------------------------------------------

def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The ``hft`` parser; ``load`` names the subcommand whose own module should be imported."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Half Fine-Tuning: train a chosen half of an LLM each round, the other half frozen.",
        epilog="Run 'hft COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hft-plugin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan(subparsers)
    add_half_reset(subparsers)
    _add_verify(subparsers)
    _add_forgetting(subparsers, load == "forgetting")
    subparsers.add_parser("run", help=_RUN_HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hft`` command; returns its exit code (0 ok, 2 bad input; ``hft verify``: 1 when the
    frozen half differs from the base)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "run":  # everything after "run" belongs to hft-run, "--" and COMMAND included
            return _run(argv[1:])
        parser = build_parser(load=command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help (0) or a usage error (2), already printed by argparse
            return done.code if isinstance(done.code, int) else 2
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return 2
        return int(func(args) or 0)
    except CommandError as error:
        return _fail(command, str(error))
    except BrokenPipeError:  # `hft plan ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as error:
        from .errors import HFTError

        if isinstance(error, HFTError):
            return _fail(command, _first_line(error))
        raise


def _fail(command: str | None, message: str) -> int:
    print(f"{PROG}{' ' + command if command else ''}: error: {message}", file=sys.stderr)
    return 2


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
