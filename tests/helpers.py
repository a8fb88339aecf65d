"""What the tests share: what "frozen" and "trained" mean, bit for bit, and the small tools more than
one test file uses (a model on the meta device, a clean environment, the hft command's output)."""

from __future__ import annotations

import os

import torch

from hft_plugin.testing import assert_frozen_and_trained, snapshot  # noqa: F401 - re-exported for the tests

# A fixed batch to read a model's outputs with (the same bits in every test that compares logits).
PROBE = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def flags(model) -> dict[str, bool]:
    """Each parameter's ``requires_grad``, by name."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def logits(model) -> torch.Tensor:
    """The model's logits on :data:`PROBE`, without a graph."""
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def state(model) -> dict[str, torch.Tensor]:
    """A copy of the model's ``state_dict()``: its tensors by name, as a checkpoint holds them, read
    through the public API only (whatever the plugin keeps inside the model)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def storage(p: torch.Tensor) -> int:
    """Where a tensor's storage starts: equal for two tensors that share their bytes."""
    return p.untyped_storage().data_ptr()


class MixingSGD(torch.optim.Optimizer):
    """Every element moves by its gradient plus the tensor's mean gradient: an update that mixes the
    elements of a tensor, like the orthogonalising optimizers (Muon). Masking gradients alone cannot
    keep frozen elements still under it."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + p.grad.mean() + 1e-3, alpha=-group["lr"])


def train_steps(model, optimizer, steps: int = 4, seed: int = 0, vocab: int = 96, handle=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if handle is not None:
            handle.mask_gradients()  # as a trainer does before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def meta_model(model_type: str, **overrides):
    """The causal LM of ``model_type``'s default config (``overrides`` applied) on the meta device:
    names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **overrides))


def clean_env(**overrides) -> dict[str, str]:
    """This process's environment without any ``HFT_*`` variable (any case), plus ``overrides``: for
    a subprocess that must start from HFT unset."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("HFT_")}
    environ.update(overrides)
    return environ


def run_hft(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the ``hft`` command in this process: (exit code, stdout, stderr)."""
    from hft_plugin.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def plain_trainer(tmp_path, family="llama", model=None, **overrides):
    """A ``transformers.Trainer`` on a tiny model of ``family`` (or ``model``) and a tiny causal-LM
    dataset, writing under ``tmp_path / "out"``; ``overrides`` go into its TrainingArguments."""
    from transformers import Trainer

    from hft_plugin.testing import tiny_model, tiny_tokenizer

    from ._workers.common import collate, lm_dataset, train_args

    tokenizer = tiny_tokenizer()
    model = model if model is not None else tiny_model(family)
    return Trainer(model=model, args=train_args(tmp_path / "out", **overrides),
                   train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
