"""``hft forgetting BASE TUNED``: the forgetting monitor's measurement between two checkpoints.

    hft forgetting BASE TUNED [--texts FILE] [--samples N] [--length L] [--seed S]
                              [--device D] [--dtype T] [--json]

Both models are loaded whole (a folder, a ``.gguf`` file, or a Hub id through the Hugging Face
cache) and compared on the same probes as the live monitor (:mod:`hft_plugin.forgetting`): the
texts of ``--texts``, else the ``hft_probes.json`` a training run left in TUNED (the probes its
live curve was measured on), else ``--samples`` new samples of BASE. Models with different
vocabularies are refused (:class:`~hft_plugin.errors.VocabularyMismatchError`, exit code 2).

Example:
    >>> import tempfile
    >>> from hft_plugin.testing import tiny_model, tiny_tokenizer
    >>> folder = tempfile.mkdtemp()
    >>> tiny_model("llama").save_pretrained(folder); tiny_tokenizer().save_pretrained(folder)  # doctest: +ELLIPSIS
    (...)
    >>> from hft_plugin.cli import main
    >>> main(["forgetting", folder, folder, "--samples", "2", "--length", "8"])  # doctest: +ELLIPSIS
    base:   ...
    forgetting/kl         0.000000 nats per token ...
    0
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .parsing import flag_type, parse_int
from .errors import HFTError, VocabularyMismatchError
from .forgetting import (DEFAULT_LENGTH, DEFAULT_SAMPLES, PROBE_SEED, PROBES_FILE, ModelBase, Probes, context_length,
                         encode_texts, measure, read_texts, sample_probes, vocab_size)

_DTYPES = ("float32", "bfloat16", "float16", "auto")


class SourceError(HFTError, ValueError):
    """A BASE or TUNED that cannot be loaded as a causal language model."""


def _split_gguf(source: str) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, extra keyword arguments) for a folder, .gguf file or Hub id."""
    looks_local = source.startswith((".", "/", "~")) or source.endswith((".gguf", ".json")) or source.count("/") > 1
    if not os.path.exists(source) and looks_local:  # a Hub id is "owner/name": leave it to the Hub
        raise SourceError(f"no such file or directory: {source}; pass a model folder, a .gguf file or a Hub id.")
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise SourceError(f"{source} is a file but not a .gguf file; pass a model folder, a .gguf file or a Hub id.")
        folder, name = os.path.split(os.path.abspath(source))
        return folder, {"gguf_file": name}
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return source, {"gguf_file": ggufs[0]}
        raise SourceError(f"{source} has no config.json and {len(ggufs)} .gguf files; pass a model folder or one "
                          ".gguf file.")
    return source, {}


def load(source: str, *, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer or None) of ``source``; :class:`SourceError` naming it if it cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, extra = _split_gguf(source)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except Exception as error:  # noqa: BLE001 - a missing folder, an offline Hub id, a damaged file: one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SourceError(f"cannot load {source} as a causal language model ({first})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except Exception:  # noqa: BLE001 - no tokenizer: probes are token ids
        tokenizer = None
    return model.to(device).eval(), tokenizer


def check_same_vocabulary(base, tuned, base_tokenizer, tuned_tokenizer, names: tuple[str, str]) -> None:
    """Refuse two models whose next-token distributions are not over the same tokens."""
    sizes = vocab_size(base), vocab_size(tuned)
    if sizes[0] != sizes[1]:
        raise VocabularyMismatchError(f"{names[0]} predicts {sizes[0]:,} tokens and {names[1]} {sizes[1]:,}: the two "
                                      "models have different vocabularies, so their distributions cannot be compared.")
    if base_tokenizer is not None and tuned_tokenizer is not None:
        a, b = base_tokenizer.get_vocab(), tuned_tokenizer.get_vocab()
        if a != b:
            token = next((t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)), None)
            raise VocabularyMismatchError(f"the tokenizers of {names[0]} and {names[1]} differ (e.g. token {token!r}: "
                                          f"{a.get(token)} and {b.get(token)}), so the same ids are different text.")


def _probes(args, base, tokenizer) -> tuple[Probes, str]:
    vocab, context = vocab_size(base), context_length(base)
    if args.texts is not None:
        texts = read_texts(args.texts)
        probes = texts if isinstance(texts, Probes) else encode_texts(texts, tokenizer, vocab_size=vocab,
                                                                       context=context)
        probes.check_fits(vocab, context, args.texts)
        return probes, f"{probes.describe()} from {args.texts}"
    saved = os.path.join(args.tuned, PROBES_FILE) if os.path.isdir(args.tuned) else None
    if args.samples is None and saved is not None and os.path.isfile(saved):
        probes = Probes.load(saved)
        probes.check_fits(vocab, context, saved)
        return probes, f"{probes.describe()}, from {saved} (the run's own)"
    probes = sample_probes(base, count=args.samples or DEFAULT_SAMPLES, length=args.length, seed=args.seed,
                           tokenizer=tokenizer)
    return probes, probes.describe()


def run_cli(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for source in (args.base, args.tuned):  # both named before either is loaded
        _split_gguf(source)
    base, base_tokenizer = load(args.base, device=device, dtype=args.dtype)
    tuned, tuned_tokenizer = load(args.tuned, device=device, dtype=args.dtype)
    check_same_vocabulary(base, tuned, base_tokenizer, tuned_tokenizer, ("BASE", "TUNED"))
    probes, described = _probes(args, base, base_tokenizer)
    result = measure(tuned, probes, ModelBase(base))
    if args.json:
        print(json.dumps({"base": args.base, "tuned": args.tuned, "probes": described, **result.metrics(),
                          "nll": result.nll, "base_nll": result.base_nll, "tokens": result.tokens,
                          "per_probe_kl": result.per_probe_kl}, indent=1))
        return 0
    total = sum(p.numel() for p in base.parameters())
    print(f"base:   {args.base} ({type(base).__name__}, {total:,} parameters)")
    print(f"tuned:  {args.tuned}")
    print(f"probes: {described}")
    print(f"forgetting/kl        {result.kl:9.6f} nats per token  (KL(base || tuned), mean over {result.tokens:,} "
          "positions)")
    print(f"forgetting/nll_delta {result.nll_delta:+9.6f} nats per token  (tuned {result.nll:.4f} - base "
          f"{result.base_nll:.4f})")
    worst = max(range(len(result.per_probe_kl)), key=result.per_probe_kl.__getitem__)
    text = probes.texts[worst]
    shown = "" if text is None else f": {text[:60]!r}{'...' if len(text) > 60 else ''}"
    print(f"most moved probe: #{worst} (KL {result.per_probe_kl[worst]:.6f}){shown}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``forgetting`` to an argparse subparsers object (the ``hft`` command uses this)."""
    parser = subparsers.add_parser(
        "forgetting", help="how far TUNED moved from BASE: KL and NLL change on probe texts",
        description="Load BASE and TUNED and print the mean per-token KL(BASE || TUNED) of their next-token "
                    "distributions and the change of the probes' NLL, on the probes the live monitor uses.",
        epilog="example: hft forgetting ./SmolLM2-135M ./out --texts general.txt",
    )
    parser.add_argument("base", metavar="BASE", help="the model before training: a folder, a .gguf file or a Hub id")
    parser.add_argument("tuned", metavar="TUNED", help="the model after training (the same vocabulary)")
    parser.add_argument("--texts", metavar="FILE", help="probe texts: one per line, a JSON list, JSON Lines, or an "
                                                        f"{PROBES_FILE}")
    parser.add_argument("--samples", type=flag_type(parse_int, "--samples"), metavar="N",
                        help=f"draw N new samples of BASE (default: TUNED's {PROBES_FILE} if it has one, else "
                             f"{DEFAULT_SAMPLES})")
    parser.add_argument("--length", type=flag_type(parse_int, "--length"), default=DEFAULT_LENGTH, metavar="L",
                        help=f"tokens per sample, the start token included (default {DEFAULT_LENGTH})")
    parser.add_argument("--seed", type=flag_type(parse_int, "--seed"), default=PROBE_SEED,
                        help="seed of the samples' generator (default: the monitor's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights' dtype (default float32)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(func=run_cli)
    return parser
