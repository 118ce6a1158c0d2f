"""Student construction: layer mapping, architectures, tokenizer compatibility."""

import pytest
import torch
from tiny import make_tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distilops.pipeline.modeling import (
    ModelError,
    build_student,
    check_same_tokenizer,
    layer_map,
    load_classifier,
    load_tokenizer,
    target_layer_map,
)


@pytest.mark.parametrize("arch,prefix", [("bert", "bert"), ("mpnet", "mpnet")])
def test_student_layer_i_is_teacher_layer_2i(tmp_path, arch, prefix):
    teacher = load_classifier(str(make_tiny_model(tmp_path / "t", layers=4, arch=arch)))
    student = build_student(teacher)
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for i in range(2):
        s_keys = [k for k in s_state if f".encoder.layer.{i}." in k]
        assert s_keys
        for key in s_keys:
            assert torch.equal(s_state[key], t_state[key.replace(f".layer.{i}.", f".layer.{2 * i}.")]), key
    # embeddings and the classifier head come from the teacher too
    for key in s_state:
        if ".encoder.layer." not in key:
            assert torch.equal(s_state[key], t_state[key]), key


def test_student_differs_from_a_copy_of_the_first_layers(tmp_path):
    teacher = load_classifier(str(make_tiny_model(tmp_path / "t", layers=4)))
    student = build_student(teacher)
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(student.state_dict()[key], teacher.state_dict()[key])  # layer 1 <- 2, not 1


def test_layer_map_general_and_bad_sizes():
    assert layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert layer_map(6, 3) == [0, 2, 4]
    assert layer_map(12, 4) == [0, 3, 6, 9]
    with pytest.raises(ModelError, match="1..6"):
        layer_map(6, 7)


def test_each_student_layer_learns_the_last_teacher_layer_of_the_block_it_replaces():
    assert target_layer_map(6, 3) == [1, 3, 5]  # initialised from 0, 2, 4
    assert target_layer_map(12, 4) == [2, 5, 8, 11]
    assert target_layer_map(2, 1) == [1] and target_layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ModelError, match="1..6"):
        target_layer_map(6, 0)


def test_student_runs_and_is_smaller(tmp_path):
    teacher = load_classifier(str(make_tiny_model(tmp_path / "t", layers=4)))
    student = build_student(teacher, 1)
    out = student(input_ids=torch.tensor([[2, 10, 11, 3]]))
    assert out.logits.shape == (1, 2)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_same_tokenizer_passes_and_mismatch_is_clear(tmp_path):
    folder = make_tiny_model(tmp_path / "t")
    tok = load_tokenizer(str(folder))
    check_same_tokenizer(tok, load_tokenizer(str(folder)), "copy")
    other = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[PAD]": 1, "hello": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    mismatched = PreTrainedTokenizerFast(tokenizer_object=other, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(ModelError, match="different tokenizer"):
        check_same_tokenizer(tok, mismatched, "other-model")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="could not load"):
        load_classifier(str(tmp_path / "no-such-folder"))
