"""The DistilBERT distillation loss, with optional layer-wise terms after TinyBERT and MiniLM.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))      (soft targets, batchmean)
         + (1 - alpha) * CE(s, y)                                  (hard labels)
         + cosine_weight * mean over real tokens of (1 - cos(h_s, h_t))   (optional, last hidden states)
         + hidden_mse_weight * mean over mapped layers of MSE(W h_s^i, h_t^map[i])      (optional, TinyBERT)
         + attention_weight * mean over mapped layers of KL(A_t^map[i] || A_s^i)         (optional, MiniLM)
           (KL per head and real query token, over keys)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when
T changes (Hinton et al., 2015). Teacher tensors are detached: gradients reach the student only
(and the projection W, which trains with it).

`layer_map[i]` is the teacher layer (0-based) whose outputs student layer i learns to reproduce
(modeling.target_layer_map). Hidden states and attentions are given as Hugging Face returns them
(`output_hidden_states`: index 0 = the embeddings' output, index i + 1 = layer i's; `output_attentions`:
index i = layer i's). The embeddings' output is not mapped: one map then serves both terms (there are
no embedding attentions), and the embeddings learn through every layer above them.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    hidden_mse: torch.Tensor  # 0 when hidden_mse_weight is 0
    attention_kl: torch.Tensor  # 0 when attention_weight is 0


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


def check_layer_map(student_layers: int, teacher_layers: int, layer_map: Sequence[int]) -> None:
    """One teacher layer per student layer, each one the teacher has: else a clear error, not an IndexError."""
    if len(layer_map) != student_layers:
        raise ValueError(f"layer_map maps {len(layer_map)} layer(s), the student has {student_layers}")
    if not all(0 <= t < teacher_layers for t in layer_map):
        raise ValueError(f"layer_map {list(layer_map)} names a layer the teacher lacks (it has {teacher_layers})")


def masked_token_mean(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token `values` [batch, tokens, ...] over real tokens (and every trailing position)."""
    mask = attention_mask.to(values.dtype).reshape(*attention_mask.shape, *[1] * (values.dim() - 2))
    per_token = values[0, 0].numel()  # e.g. the heads of one query
    return (values * mask).sum() / (mask.sum() * per_token).clamp(min=1)


def hidden_mse_loss(student_hidden_states: Sequence[torch.Tensor], teacher_hidden_states: Sequence[torch.Tensor],
                    layer_map: Sequence[int], attention_mask: torch.Tensor,
                    projection: torch.nn.Module | None = None) -> torch.Tensor:
    """TinyBERT's hidden-state loss (Jiao et al., 2020), averaged over the mapped layers:

        L_i = sum over real tokens n, teacher dims d of (W h_s^i[n] - h_t^map[i][n])_d^2 / (real tokens * d_t)

    where h^i is layer i's output (hidden_states[i + 1]) and W = `projection` (TinyBERT's W_h, an
    nn.Linear(student width, teacher width) trained with the student); no projection = the identity,
    which needs equal widths. Padding tokens do not count.
    """
    check_layer_map(len(student_hidden_states) - 1, len(teacher_hidden_states) - 1, layer_map)
    losses = []
    for i, t in enumerate(layer_map):
        student = student_hidden_states[i + 1].float()
        teacher = teacher_hidden_states[t + 1].detach().float()
        if projection is not None:
            student = projection(student)
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"hidden widths differ (student {student.shape[-1]}, teacher {teacher.shape[-1]}): "
                             "the hidden-state loss needs a projection")
        losses.append(masked_token_mean((student - teacher).pow(2).mean(-1), attention_mask))
    return torch.stack(losses).mean()


def attention_kl_loss(student_attentions: Sequence[torch.Tensor], teacher_attentions: Sequence[torch.Tensor],
                      layer_map: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's self-attention distribution transfer (Wang et al., 2020), averaged over the mapped layers:

        L_i = sum over heads a, real queries q of KL(A_t^map[i][a, q, :] || A_s^i[a, q, :]) / (heads * real queries)

    with KL(p || r) = sum over real keys k of p_k * log(p_k / r_k), A = softmax attention probabilities
    [batch, heads, queries, keys]. KL of the distributions, as MiniLM (TinyBERT takes the MSE of the
    scores before the softmax, which Hugging Face does not return). Padding keys, where both distributions
    are 0, add nothing. Head counts must be equal: each student head learns the same teacher head.
    """
    check_layer_map(len(student_attentions), len(teacher_attentions), layer_map)
    losses = []
    for i, t in enumerate(layer_map):
        student, teacher = student_attentions[i].float(), teacher_attentions[t].detach().float()
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"the attention loss needs equal head counts: student layer {i} has {student.shape[1]}, "
                             f"teacher layer {t} has {teacher.shape[1]}")
        # log of the student's 0s (padding keys) clamped: 0 * log 0 must be 0, and its gradient too, not NaN
        log_student = student.clamp(min=torch.finfo(student.dtype).tiny).log()
        kl = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(-1)  # [batch, heads, queries]
        losses.append(masked_token_mean(kl.transpose(1, 2), attention_mask))  # queries next to the batch axis
    return torch.stack(losses).mean()


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
    hidden_mse_weight: float = 0.0,
    attention_weight: float = 0.0,
    student_hidden_states: Sequence[torch.Tensor] | None = None,
    teacher_hidden_states: Sequence[torch.Tensor] | None = None,
    student_attentions: Sequence[torch.Tensor] | None = None,
    teacher_attentions: Sequence[torch.Tensor] | None = None,
    layer_map: Sequence[int] | None = None,
    projection: torch.nn.Module | None = None,
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
    hidden_mse = torch.zeros((), device=student_logits.device)
    if hidden_mse_weight > 0:
        if student_hidden_states is None or teacher_hidden_states is None or layer_map is None \
                or attention_mask is None:
            raise ValueError("hidden_mse_weight > 0 needs student_hidden_states, teacher_hidden_states, layer_map "
                             "and attention_mask")
        hidden_mse = hidden_mse_loss(student_hidden_states, teacher_hidden_states, layer_map, attention_mask,
                                     projection)
        total = total + hidden_mse_weight * hidden_mse
    attention_kl = torch.zeros((), device=student_logits.device)
    if attention_weight > 0:
        if student_attentions is None or teacher_attentions is None or layer_map is None or attention_mask is None:
            raise ValueError("attention_weight > 0 needs student_attentions, teacher_attentions, layer_map "
                             "and attention_mask")
        attention_kl = attention_kl_loss(student_attentions, teacher_attentions, layer_map, attention_mask)
        total = total + attention_weight * attention_kl
    return LossParts(total=total, soft=soft, hard=hard, cosine=cosine, hidden_mse=hidden_mse,
                     attention_kl=attention_kl)
