"""The torch-free inference path: the `tokenizers` encoder gives exactly the ids transformers gives, and
a PyTorch folder needs torch only when it is one."""

import numpy as np
import pytest
from tiny import make_tiny_model
from transformers import AutoTokenizer

from distilops.errors import ModelError
from distilops.predict import TextClassifier, TextEncoder, softmax

TEXTS = [
    "a wonderful, moving film",
    "tedious",
    "THE Plot Is Messy — but the acting is superb!",
    "café naïve résumé 日本語 😀",
    " ".join(["great film"] * 40),  # longer than the window: cut, and flagged
    "x",
]


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_the_encoder_matches_transformers_tokenizer(tmp_path, arch):
    folder = make_tiny_model(tmp_path / arch, arch=arch)
    reference = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, truncation=True, max_length=16,
                                                      return_tensors="np")
    batch, truncated = TextEncoder(folder, 16)(TEXTS)
    for key in reference:  # input_ids, attention_mask (+ token_type_ids for BERT)
        np.testing.assert_array_equal(batch[key], reference[key], err_msg=key)
    full = [len(ids) for ids in AutoTokenizer.from_pretrained(folder)(TEXTS)["input_ids"]]
    assert truncated == [n > 16 for n in full] and any(truncated)


def test_softmax_is_a_stable_probability():
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def test_a_folder_without_a_model_or_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no model file found"):
        TextClassifier(tmp_path)
    folder = make_tiny_model(tmp_path / "m")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="tokenizer_config.json: cannot read it"):
        TextClassifier(folder)
