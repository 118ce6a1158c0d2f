"""The DistilBERT distillation loss.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))      (soft targets, batchmean)
         + (1 - alpha) * CE(s, y)                                  (hard labels)
         + cosine_weight * mean over real tokens of (1 - cos(h_s, h_t))   (optional, hidden states)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when
T changes (Hinton et al., 2015). Teacher tensors are detached: gradients reach the student only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNLABELLED = -100  # the label of a transfer text (PyTorch's ignore_index)


@dataclass
class LossParts:
    total: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    cosine: torch.Tensor


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of (1 - cosine similarity) between aligned hidden states over non-padding tokens."""
    cos = F.cosine_similarity(student_hidden, teacher_hidden.detach().to(student_hidden.dtype), dim=-1)
    mask = attention_mask.to(cos.dtype)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    cosine_weight: float = 0.0,
    student_hidden: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> LossParts:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    labelled = labels != UNLABELLED  # transfer texts have soft targets only: the hard term skips them
    hard = (F.cross_entropy(student_logits[labelled], labels[labelled]) if bool(labelled.any())
            else student_logits.sum() * 0.0)
    total = alpha * soft + (1 - alpha) * hard
    cosine = torch.zeros((), device=student_logits.device)
    if cosine_weight > 0:
        if student_hidden is None or teacher_hidden is None or attention_mask is None:
            raise ValueError("cosine_weight > 0 needs student_hidden, teacher_hidden and attention_mask")
        cosine = hidden_cosine_loss(student_hidden, teacher_hidden, attention_mask)
        total = total + cosine_weight * cosine
    return LossParts(total=total, soft=soft, hard=hard, cosine=cosine)
