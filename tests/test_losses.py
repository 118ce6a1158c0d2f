"""The distillation loss against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from distilops.pipeline.losses import UNLABELLED, distillation_loss, hidden_cosine_loss, soft_target_loss


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
