"""Every rank of a distributed job must train the same half.

``select_half`` is deterministic, so ranks agree by construction when they are given the same
model and options; a rank started with another seed or round would silently train another half
and its gradients would be averaged with the others'. :func:`check_ranks_agree` compares a digest
of each rank's selection once (one ``all_gather_object``) and refuses a disagreement on every rank,
before anything trains. Outside an initialised process group it does nothing.
"""

from __future__ import annotations

import torch

from .checkpoints import selection_digest
from .errors import SelectionMismatchError
from .selection import Selection


def check_ranks_agree(selection: Selection, agreed: str | None = None) -> str | None:
    """Check that every rank selected the same half; returns the agreed digest.

    ``agreed`` is the digest a previous call returned: when it matches, nothing is communicated
    (so an adapter can call this at every training start for free). Collective: every rank of the
    default process group must call it.

    Raises:
        SelectionMismatchError: on every rank, naming each rank's digest and options.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return agreed
    digest = selection_digest(selection)
    if digest == agreed:
        return agreed
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (digest, selection.config.to_dict()))
    if len({d for d, _ in gathered}) > 1:
        rank = torch.distributed.get_rank()
        lines = "; ".join(f"rank {r}: {d} {c}" for r, (d, c) in enumerate(gathered))
        raise SelectionMismatchError(
            f"The ranks selected different halves (this is rank {rank}): {lines}. Give every rank the same "
            "HFT options (ratio, strategy, round, seed; with strategy='shielded' the same scores file, on a "
            "shared file system or copied byte for byte) and the same model."
        )
    return digest
