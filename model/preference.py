"""DPO on either kind of base: the log-probability of each row's answer, and the loss of a pair.

A preference batch holds 2B rows, [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1], that share
their prompts' images: the model's forward (`pairs=True`) runs the tower and the connector once on
the B prompts' images and writes the features into both halves (`VisionLanguageModel.embed_inputs`
with `copies=2`; a released VLM's `pair_inputs`, through transformers' `mm_encoder_outputs`), then
`sequence_logps` sums, row by row, the log-probability of every labelled token (the answer and its
end of turn, as supervised training labels them).

`dpo_loss` is DPO's sigmoid loss (Rafailov et al. 2023) as TRL's `DPOTrainer` computes it
(`loss_type="sigmoid"`, plus `"sft"` for the supervised term on the chosen answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from constants import IGNORE_INDEX


@dataclass
class SequenceLogps(ModelOutput):
    """`logps` [R]: each row's summed log-probability of its labelled tokens; `tokens` [R]: how many."""

    logps: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def sequence_logps(model, inputs: dict, labels: torch.Tensor) -> SequenceLogps:
    """Row sums of log p(label) under `model`, the logits computed at labelled positions only
    (`model.logits_at`, the model's own head: a soft-capped one included). `inputs`: what the
    model's `logits_at` reads; labels [R, L]."""
    shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [R, L]; t predicts t + 1
    keep = shift_labels != IGNORE_INDEX  # [R, L]
    logits = model.logits_at(inputs, keep).logits  # [N, V]
    if logits.dim() == 3:  # an LLM that ignores logits_to_keep: [R, L, V]
        logits = logits[keep]
    token_logps = -nn.functional.cross_entropy(logits.float(), shift_labels[keep], reduction="none")  # [N]
    rows = keep.nonzero()[:, 0]  # [N]: the row of each labelled token
    logps = token_logps.new_zeros(labels.shape[0]).index_add(0, rows, token_logps)  # [R]
    return SequenceLogps(logps=logps, tokens=keep.sum(dim=1))


def twice(output):
    """A vision output (a tensor, a tuple/list of per-image tensors, or a ModelOutput of those)
    for the same images given twice, in order: what the 2B rows of a pair batch read."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, (list, tuple)):
        if output and all(isinstance(item, (list, tuple)) for item in output):
            # Per layer, each per image (Qwen3-VL's deepstack features): each layer's images twice.
            return type(output)(twice(item) for item in output)
        return type(output)([*output, *output])  # per image
    if isinstance(output, ModelOutput):
        return type(output)(**{key: twice(value) for key, value in output.items()})
    return output


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, beta: float,
             sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) of a batch: `policy`, `reference` [2B] summed log-probs of the rows (chosen
    half first), `tokens` [2B] their labelled tokens. Loss: mean over pairs of
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), plus `sft_weight` times the chosen
    answers' mean token NLL. Metrics (detached, per pair [B]): the implicit rewards
    beta * (pi - ref) of both answers, their margin, whether the chosen one wins, the log-probs."""
    chosen, rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.to(policy.dtype).chunk(2)
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    loss = -nn.functional.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    if sft_weight:
        chosen_tokens = tokens.chunk(2)[0].sum().clamp(min=1)
        loss = loss + sft_weight * (-chosen.sum() / chosen_tokens)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return loss, metrics
