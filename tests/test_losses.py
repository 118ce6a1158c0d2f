"""The distillation loss against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from distilops.pipeline.losses import (
    UNLABELLED,
    attention_kl_loss,
    distillation_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    soft_target_loss,
)


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
LABELS = [1, 2]


def hand_soft(temperature: float) -> float:
    per_example = [kl(softmax([t / temperature for t in tr]), softmax([s / temperature for s in sr]))
                   for sr, tr in zip(STUDENT, TEACHER, strict=True)]
    return sum(per_example) / len(per_example) * temperature**2  # batchmean, times T^2


def hand_ce() -> float:
    return sum(-math.log(softmax(s)[y]) for s, y in zip(STUDENT, LABELS, strict=True)) / len(LABELS)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_soft_term_is_batchmean_kl_times_t_squared(temperature):
    got = soft_target_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature)
    assert got.item() == pytest.approx(hand_soft(temperature), rel=1e-5)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.3, 3.0), (0.9, 1.0)])
def test_total_mixes_soft_and_hard_by_alpha(alpha, temperature):
    parts = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS),
                              temperature=temperature, alpha=alpha)
    expected = alpha * hand_soft(temperature) + (1 - alpha) * hand_ce()
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)
    assert parts.hard.item() == pytest.approx(hand_ce(), rel=1e-5)


def test_alpha_one_is_pure_soft_targets_and_ignores_labels():
    a = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS),
                          temperature=2.0, alpha=1.0)
    b = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 0]),
                          temperature=2.0, alpha=1.0)
    assert a.total.item() == pytest.approx(hand_soft(2.0), rel=1e-5)
    assert a.total.item() == pytest.approx(b.total.item())


def test_alpha_zero_is_plain_cross_entropy_and_ignores_teacher():
    a = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS),
                          temperature=3.0, alpha=0.0)
    b = distillation_loss(torch.tensor(STUDENT), -torch.tensor(TEACHER), torch.tensor(LABELS),
                          temperature=3.0, alpha=0.0)
    assert a.total.item() == pytest.approx(hand_ce(), rel=1e-6)
    assert a.total.item() == pytest.approx(b.total.item())


def test_identical_logits_have_zero_soft_loss():
    logits = torch.tensor(TEACHER)
    assert soft_target_loss(logits.clone(), logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    s_hidden = torch.randn(2, 4, 8, requires_grad=True)
    t_hidden = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    parts = distillation_loss(student, teacher, torch.tensor(LABELS), temperature=2.0, alpha=0.5,
                              cosine_weight=1.0, student_hidden=s_hidden, teacher_hidden=t_hidden,
                              attention_mask=mask)
    parts.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert s_hidden.grad is not None and s_hidden.grad.abs().sum() > 0
    assert teacher.grad is None and t_hidden.grad is None


def test_cosine_loss_counts_only_real_tokens():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-5.0, -5.0]]])
    mask = torch.tensor([[1, 1, 0]])  # third token is padding: its cos of -1 must not count
    # token 1: cos 1 -> 0; token 2: cos 0 -> 1; mean over 2 real tokens = 0.5
    assert hidden_cosine_loss(s, t, mask).item() == pytest.approx(0.5)


def test_cosine_weight_adds_to_total():
    s_hidden, t_hidden = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.long)
    kwargs = dict(temperature=2.0, alpha=0.5, student_hidden=s_hidden, teacher_hidden=t_hidden, attention_mask=mask)
    base = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), **kwargs)
    with_cos = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS),
                                 cosine_weight=0.25, **kwargs)
    expected = base.total.item() + 0.25 * hidden_cosine_loss(s_hidden, t_hidden, mask).item()
    assert with_cos.total.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0, alpha=0.5), "temperature"),
    (dict(temperature=1.0, alpha=1.5), "alpha"),
    (dict(temperature=1.0, alpha=0.5, cosine_weight=1.0), "hidden"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), **kwargs)


def test_unlabelled_transfer_rows_get_soft_targets_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
    labels = torch.tensor([0, 1, UNLABELLED, 1, UNLABELLED, 0])
    parts = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    labelled = labels != UNLABELLED
    assert torch.isclose(parts.hard, F.cross_entropy(student[labelled], labels[labelled]))  # mean over labelled
    assert torch.isclose(parts.soft, distillation_loss(student, teacher, labels.clamp(min=0), temperature=2.0,
                                                       alpha=0.3).soft)  # every row's soft target counts
    only_transfer = distillation_loss(student, teacher, torch.full((6,), UNLABELLED), temperature=2.0, alpha=0.3)
    assert only_transfer.hard.item() == 0.0 and torch.isfinite(only_transfer.total)
    only_transfer.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0  # the soft term still teaches


# --- layer-wise terms: hidden-state MSE (TinyBERT), attention-distribution KL (MiniLM) -------------------------

MASK = torch.tensor([[1, 1, 0]])  # 1 sequence, 2 real tokens, then padding
EMBEDDINGS = torch.full((1, 3, 2), 9.0)  # hidden_states[0]: never mapped
S_LAYER = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [7.0, 7.0]]])
T_LAYER_0 = torch.tensor([[[100.0, 100.0], [100.0, 100.0], [100.0, 100.0]]])
T_LAYER_1 = torch.tensor([[[0.0, 2.0], [2.0, 1.0], [-7.0, 0.0]]])


def test_hidden_mse_is_tinybert_mse_over_real_tokens_of_the_mapped_layer():
    student = (EMBEDDINGS, S_LAYER)  # as output_hidden_states returns them: embeddings, then each layer
    teacher = (EMBEDDINGS, T_LAYER_0, T_LAYER_1)
    # student layer 0 <- teacher layer 1 (hidden_states[2]); teacher layer 0 (all 100s) must not count
    # token 1: diff (1, 0) -> squares (1, 0) -> mean over dims 0.5
    # token 2: diff (-2, 0) -> squares (4, 0) -> mean 2.0
    # token 3 is padding: diff (14, 7) -> 122.5 must not count;  mean over 2 real tokens = (0.5 + 2.0) / 2
    assert hidden_mse_loss(student, teacher, [1], MASK).item() == pytest.approx(1.25)
    # mapped to teacher layer 0 instead: token 1 (99^2 + 98^2) / 2 = 9702.5, token 2 (100^2 + 99^2) / 2 = 9900.5
    assert hidden_mse_loss(student, teacher, [0], MASK).item() == pytest.approx((9702.5 + 9900.5) / 2)


def test_hidden_mse_averages_the_mapped_layers():
    student = (EMBEDDINGS, S_LAYER, T_LAYER_1)
    teacher = (EMBEDDINGS, T_LAYER_1, T_LAYER_1)
    # layer 0: 1.25 (above); layer 1 equals its teacher layer: 0.0; mean over the 2 layers
    assert hidden_mse_loss(student, teacher, [0, 1], MASK).item() == pytest.approx(0.625)


def test_hidden_mse_projects_the_student_to_the_teacher_width():
    projection = torch.nn.Linear(1, 2)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        projection.bias.copy_(torch.tensor([0.0, 1.0]))
    student = (torch.zeros(1, 2, 1), torch.tensor([[[3.0], [1.0]]], requires_grad=True))
    teacher = (torch.zeros(1, 2, 2), torch.tensor([[[5.0, -2.0], [2.0, 2.0]]], requires_grad=True))
    # W h + b: token 1: (2*3 + 0, -1*3 + 1) = (6, -2); token 2: (2, 0)
    # diffs to the teacher: (1, 0) -> 0.5 and (0, -2) -> 2.0; mean = 1.25
    loss = hidden_mse_loss(student, teacher, [0], torch.tensor([[1, 1]]), projection)
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    # dL/dW[0] = mean over tokens of (1/2) * 2 * diff_0 * h = (1 * 3 + 0 * 1) / 2 = 1.5
    # dL/dW[1] = (0 * 3 + (-2) * 1) / 2 = -1.0
    assert projection.weight.grad.flatten().tolist() == pytest.approx([1.5, -1.0])
    assert student[1].grad is not None and student[1].grad.abs().sum() > 0
    assert teacher[1].grad is None  # teacher tensors are detached


def test_hidden_mse_without_a_projection_needs_equal_widths_and_a_map_per_layer():
    student = (torch.zeros(1, 2, 1), torch.zeros(1, 2, 1))
    teacher = (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="hidden widths differ .*projection"):
        hidden_mse_loss(student, teacher, [0], torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="maps 2 layer"):
        hidden_mse_loss(student, teacher, [0, 0], torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="teacher lacks"):
        hidden_mse_loss(student, teacher, [1], torch.tensor([[1, 1]]))


# [batch 1, head 1, queries 3, keys 3]; the third token is padding: no attention on it, its query row ignored
T_ATTENTION = torch.tensor([[[[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.3, 0.7, 0.0]]]])
S_ATTENTION = torch.tensor([[[[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.99, 0.01, 0.0]]]])


def hand_attention_kl() -> float:
    q0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    q1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    return (q0 + q1) / 2  # mean over 1 head x 2 real queries; the padding key adds 0 * log(0 / 0) = 0


def test_attention_kl_is_minilm_kl_over_real_queries_of_the_mapped_layer():
    uniform = torch.tensor([[[[0.5, 0.5, 0.0]] * 3]])
    assert attention_kl_loss((S_ATTENTION,), (uniform, T_ATTENTION), [1], MASK).item() == pytest.approx(
        hand_attention_kl(), rel=1e-6)
    # teacher layer 0 (uniform) instead: q0's teacher row is (0.5, 0.5) as before -> 0.5 ln(4/3);
    # q1's student row (0.5, 0.5) now equals its teacher row -> 0; mean over 2 real queries
    assert attention_kl_loss((S_ATTENTION,), (uniform, T_ATTENTION), [0], MASK).item() == pytest.approx(
        0.5 * math.log(4 / 3) / 2, rel=1e-6)


def test_attention_kl_of_identical_distributions_is_zero_and_its_gradient_finite():
    scores = torch.randn(2, 2, 3, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # padding keys get exactly 0 probability, as in the models: log 0 must not turn into NaN gradients
    student = torch.softmax(scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")), dim=-1)
    teacher = student.detach().clone().requires_grad_(True)
    loss = attention_kl_loss((student,), (teacher,), [0], mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    (loss + attention_kl_loss((student,), (torch.roll(teacher, 1, dims=-2),), [0], mask)).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0  # the student learns
    assert teacher.grad is None


def test_attention_kl_needs_equal_head_counts():
    two_heads = torch.cat([T_ATTENTION, T_ATTENTION], dim=1)
    with pytest.raises(ValueError, match="equal head counts: student layer 0 has 1, teacher layer 0 has 2"):
        attention_kl_loss((S_ATTENTION,), (two_heads,), [0], MASK)


def layer_kwargs() -> dict:
    return dict(temperature=2.0, alpha=0.5, attention_mask=MASK, layer_map=[1],
                student_hidden_states=(EMBEDDINGS, S_LAYER), teacher_hidden_states=(EMBEDDINGS, T_LAYER_0, T_LAYER_1),
                student_attentions=(S_ATTENTION,), teacher_attentions=(S_ATTENTION, T_ATTENTION))


def test_layer_weights_add_to_total_and_their_parts_are_zero_when_off():
    args = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    base = distillation_loss(*args, **layer_kwargs())
    assert base.hidden_mse.item() == 0.0 and base.attention_kl.item() == 0.0  # off: not even computed
    both = distillation_loss(*args, hidden_mse_weight=0.2, attention_weight=3.0, **layer_kwargs())
    assert both.hidden_mse.item() == pytest.approx(1.25)
    assert both.attention_kl.item() == pytest.approx(hand_attention_kl(), rel=1e-6)
    expected = 0.5 * hand_soft(2.0) + 0.5 * hand_ce() + 0.2 * 1.25 + 3.0 * hand_attention_kl()
    assert both.total.item() == pytest.approx(expected, rel=1e-6)
    assert base.total.item() == pytest.approx(0.5 * hand_soft(2.0) + 0.5 * hand_ce(), rel=1e-6)


def test_layer_terms_train_the_student_and_the_projection_only():
    s_hidden = (torch.zeros(1, 3, 1), torch.tensor([[[3.0], [1.0], [4.0]]], requires_grad=True))
    t_hidden = (torch.zeros(1, 3, 2), torch.tensor([[[5.0, -2.0], [2.0, 2.0], [0.0, 0.0]]], requires_grad=True))
    s_scores = torch.randn(1, 1, 3, 3, requires_grad=True)
    t_attention = T_ATTENTION.clone().requires_grad_(True)
    projection = torch.nn.Linear(1, 2)
    parts = distillation_loss(torch.tensor(STUDENT[:1]), torch.tensor(TEACHER[:1]), torch.tensor(LABELS[:1]),
                              temperature=2.0, alpha=0.5, hidden_mse_weight=1.0, attention_weight=1.0,
                              student_hidden_states=s_hidden, teacher_hidden_states=t_hidden,
                              student_attentions=(torch.softmax(s_scores, -1),), teacher_attentions=(t_attention,),
                              layer_map=[0], attention_mask=MASK, projection=projection)
    parts.total.backward()
    assert s_hidden[1].grad[0, :2].abs().sum() > 0 and s_hidden[1].grad[0, 2].abs().sum() == 0  # padding: none
    assert projection.weight.grad.abs().sum() > 0 and projection.bias.grad.abs().sum() > 0
    assert s_scores.grad.abs().sum() > 0
    assert t_hidden[1].grad is None and t_attention.grad is None


@pytest.mark.parametrize("weight,missing", [
    (dict(hidden_mse_weight=0.5), "teacher_hidden_states"),
    (dict(hidden_mse_weight=0.5), "layer_map"),
    (dict(attention_weight=0.5), "student_attentions"),
    (dict(attention_weight=0.5), "layer_map"),
])
def test_a_layer_weight_without_its_inputs_is_a_clear_error(weight, missing):
    kwargs = {**layer_kwargs(), **weight, missing: None}
    with pytest.raises(ValueError, match=f"{next(iter(weight))} > 0 needs .*{missing}"):
        distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), **kwargs)
