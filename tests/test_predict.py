"""The torch-free inference path: the `tokenizers` encoder gives exactly the ids transformers gives, and
a PyTorch folder needs torch only when it is one."""

import numpy as np
import pytest
from tiny import make_tiny_model
from transformers import AutoTokenizer

from distilops.errors import ModelError
from distilops.pipeline.torch_model import open_classifier
from distilops.serving.folder import write_meta
from distilops.serving.inference import OnnxModel, TextEncoder, softmax

TEXTS = [
    "a wonderful, moving film",
    "tedious",
    "THE Plot Is Messy — but the acting is superb!",
    "café naïve résumé 日本語 😀",
    " ".join(["great film"] * 40),  # longer than the window: cut, and flagged
    "x",
]


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_the_encoder_matches_transformers_tokenizer_windows_included(tmp_path, arch):
    folder = make_tiny_model(tmp_path / arch, arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, stride=4,
                          return_overflowing_tokens=True, return_tensors="np")
    windows = TextEncoder(folder, 16, window_overlap=4, max_windows=100)(TEXTS)
    for key in windows.batch:
        if key in reference:  # input_ids, attention_mask (+ token_type_ids for BERT)
            np.testing.assert_array_equal(windows.batch[key], reference[key], err_msg=key)
    owner = [i for i, (start, end) in enumerate(windows.spans) for _ in range(start, end)]
    assert owner == reference["overflow_to_sample_mapping"].tolist()
    full = [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]
    assert [n > 1 for n in windows.windows_per_text] == [n > 16 for n in full] and not any(windows.truncated)


def test_the_window_cap_cuts_a_long_text_and_flags_only_it(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    long_text = " ".join(["great film"] * 40)  # 80 tokens, 14 per window, 4 shared: windows start at 0, 10, .., 70
    windows = TextEncoder(folder, 16, window_overlap=4, max_windows=3)([long_text, "dull"])
    assert windows.windows_per_text == [3, 1] and windows.truncated == [True, False]
    assert windows.batch["input_ids"].shape == (4, 16)
    uncapped = TextEncoder(folder, 16, window_overlap=4, max_windows=8)([long_text])
    assert uncapped.windows_per_text == [8] and uncapped.truncated == [False]  # a cap it just fits cuts nothing


def test_bad_window_settings_are_a_clear_error(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    with pytest.raises(ModelError, match="window_overlap < 14"):
        TextEncoder(folder, 16, window_overlap=14)
    with pytest.raises(ModelError, match="max_windows >= 1"):
        open_classifier(folder, max_windows=0)


def test_a_long_text_scores_the_mean_of_its_windows_logits(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    write_meta(folder, max_length=16, window_overlap=4, max_windows=8)
    classifier = open_classifier(folder, threads=1)
    long_text, short = " ".join(["great film", "bad plot", "superb acting"] * 9), "dull"
    reference = AutoTokenizer.from_pretrained(folder)([long_text], truncation=True, max_length=16, stride=4,
                                                      return_overflowing_tokens=True, padding=True, return_tensors="np")
    window_logits = classifier.model({k: v.astype(np.int64) for k, v in reference.items()
                                      if k != "overflow_to_sample_mapping"})
    assert len(window_logits) > 1
    got = classifier.predict_logits([long_text, short])
    np.testing.assert_allclose(got[0], window_logits.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(got[1], classifier.predict_logits([short])[0], atol=1e-5)  # padding changes nothing
    prediction = classifier.classify([long_text, short])
    assert [p.windows for p in prediction] == [len(window_logits), 1] and not any(p.truncated for p in prediction)
    assert prediction[0].score == pytest.approx(softmax(got[:1])[0].max(), abs=1e-5)


def test_softmax_is_a_stable_probability():
    probs = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def test_a_folder_without_a_model_or_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no model file found"):
        open_classifier(tmp_path)
    folder = make_tiny_model(tmp_path / "m")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="tokenizer_config.json: cannot read it"):
        open_classifier(folder)


def test_a_5000_character_text_is_read_up_to_the_window_cap(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    write_meta(folder, max_length=64)  # the pipeline's window; default overlap and cap (16 windows)
    text = ("a wonderful film, " * 300)[:5000]  # about 1,200 tokens: more than 16 windows hold
    prediction = open_classifier(folder, threads=1).classify([text, "dull"])
    assert [(p.windows, p.truncated) for p in prediction] == [(16, True), (1, False)]
    assert prediction[0].label in ("rotten", "fresh") and 0.5 <= prediction[0].score <= 1


@pytest.mark.parametrize("spin_wait", [False, True])
def test_onnx_runtime_threads_spin_only_when_asked(tmp_path, spin_wait):
    """Spinning idle threads read as busy cores to a CPU autoscaler: the session turns it off by default."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # onnx writes 14,
    onnx.save(proto, tmp_path / "model.onnx")  # ONNX Runtime 1.31 reads up to 13
    model = OnnxModel(tmp_path / "model.onnx", cuda=False, threads=1, spin_wait=spin_wait)
    options = model.session.get_session_options()
    for pool in ("intra_op", "inter_op"):
        assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == ("1" if spin_wait else "0")
    batch = np.array([[1.0, 2.0]], dtype=np.float32)
    assert model({"input_ids": batch, "attention_mask": batch}).tolist() == [[1.0, 2.0]]  # extra inputs dropped
