"""Both quantization paths on a tiny model: they load through the serving code, stay faithful to the
fp32 student, shrink it, and the acceptance check rejects a variant that loses too much accuracy.
The teacher's ONNX export (the shadow model) predicts what the PyTorch teacher does, or is refused."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import make_calibration_texts, make_reviews, make_tiny_model, make_trained_student

from distilops.errors import QuantizeError
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import (
    TEACHER_VARIANT,
    Calibration,
    build,
    check,
    check_teacher,
    export_teacher,
    weights_size_mb,
)
from distilops.pipeline.torch_model import open_classifier
from distilops.serving.folder import read_meta, write_meta


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_trained_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def texts():
    df = make_reviews(n_movies=20, per_movie=5)
    return df[df["category"] != "plot"]["text"].tolist()


@pytest.fixture(scope="module")
def variants(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    calibration = Calibration.served_as(open_classifier(student), make_calibration_texts())
    return {v: build(v, student, out, calibration=calibration)
            for v in ("torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static", "onnx_fp16")}


def test_onnx_fp32_matches_the_student(student, variants, texts):
    reference = open_classifier(student).predict_logits_batched(texts, 16)
    exported = open_classifier(variants["onnx_fp32"])
    assert exported.format == "onnx"
    np.testing.assert_allclose(exported.predict_logits_batched(texts, 16), reference, atol=1e-4)


def test_dynamic_batch_and_sequence_axes(variants, texts):
    model = open_classifier(variants["onnx_int8"])
    assert model.predict_logits(texts[:1]).shape == (1, 2)
    long_batch = [" ".join(texts[:6])] * 5  # longer than the export example, another batch size
    assert model.predict_logits(long_batch).shape == (5, 2)


@pytest.mark.parametrize("variant", ["torch_int8", "onnx_int8", "onnx_int8_static"])
def test_int8_variants_stay_close_and_shrink(student, variants, texts, variant):
    reference = open_classifier(student).predict_logits_batched(texts, 16)
    quantized = open_classifier(variants[variant]).predict_logits_batched(texts, 16)
    spread = reference.max() - reference.min()
    assert spread > 1.0  # a trained model: its logits separate the classes (a random one: ~0.06)
    assert np.abs(quantized - reference).max() < 0.1 * spread  # int8 rounding, not a different model
    assert (quantized.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    # and int8 for real: its rounding moves the logits beyond an fp32 export's noise (< 1e-4, above); static int8,
    # with per-channel weights and scales from calibration, moves them least (~5e-4 on this model)
    assert np.abs(quantized - reference).max() > 2e-4
    assert weights_size_mb(variants[variant]) < weights_size_mb(student)
    meta = read_meta(variants[variant])
    assert meta["variant"] == variant and meta["max_length"] == 32 and meta["teacher"] == "tiny"


def test_onnx_fp16_for_gpus_keeps_fp32_logits_and_halves_the_weights(student, variants, texts):
    """What GPU pods serve: fp16 inside, int64 ids in and fp32 logits out; checked here on the CPU provider."""
    import onnx

    graph = onnx.load(str(variants["onnx_fp16"] / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    half = open_classifier(variants["onnx_fp16"])
    assert half.providers == ["CPUExecutionProvider"]
    reference = open_classifier(student).predict_logits_batched(texts, 16)
    np.testing.assert_allclose(half.predict_logits_batched(texts, 16), reference, atol=2e-3)
    # half the weights' bytes; the graph itself weighs more in so tiny a model
    assert weights_size_mb(variants["onnx_fp16"]) < 0.7 * weights_size_mb(variants["onnx_fp32"])
    assert read_meta(variants["onnx_fp16"])["variant"] == "onnx_fp16"


@pytest.mark.parametrize("variant", ["onnx_int8", "onnx_int8_static"])
def test_onnx_int8_also_quantizes_the_embeddings(student, variants, variant):
    # MatMul weights alone would leave the (vocabulary x hidden) table in fp32: most of a small model's bytes.
    import onnx
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(student)
    graph = onnx.load(str(variants[variant] / "model.onnx")).graph
    tables = [t for t in graph.initializer if list(t.dims) == [config.vocab_size, config.hidden_size]]
    assert tables and all(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in tables)


def test_static_int8_fixes_its_activation_scales_and_records_its_calibration(variants):
    """Static: every activation is quantized by a QuantizeLinear with a constant scale (no DynamicQuantizeLinear,
    which derives one from each batch), every weight MatMul is fed int8 weights per output channel."""
    import onnx

    graph = onnx.load(str(variants["onnx_int8_static"] / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "DynamicQuantizeLinear" not in ops and ops.count("QuantizeLinear") >= 8
    constants = {t.name: t for t in graph.initializer}
    assert all(node.input[1] in constants for node in graph.node if node.op_type == "QuantizeLinear")
    int8_matrices = {name for name, t in constants.items() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    weight_scales = [constants[n.input[1]] for n in graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in int8_matrices]
    assert weight_scales and any(len(scale.dims) == 1 and scale.dims[0] > 1 for scale in weight_scales)
    dynamic = onnx.load(str(variants["onnx_int8"] / "model.onnx")).graph
    assert "DynamicQuantizeLinear" in [n.op_type for n in dynamic.node]
    meta = read_meta(variants["onnx_int8_static"])
    assert meta["variant"] == "onnx_int8_static" and meta["calibration"] == {"texts": len(make_calibration_texts()),
                                                                            "method": "minmax"}


def test_percentile_calibration_builds_a_static_variant_as_faithful(student, variants, texts, tmp_path):
    """The histogram methods need one activation shape per calibration call (texts of mixed lengths and windows
    give many): each window alone, padded to the full width. Built that way it stays as close as minmax's."""
    calibration = Calibration.served_as(open_classifier(student), make_calibration_texts(), "percentile")
    folder = build("onnx_int8_static", student, tmp_path, calibration=calibration)
    assert read_meta(folder)["calibration"]["method"] == "percentile"
    reference = open_classifier(student).predict_logits_batched(texts, 16)
    logits = open_classifier(folder).predict_logits_batched(texts, 16)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    assert np.abs(logits - reference).max() < 0.1 * (reference.max() - reference.min())


def test_static_int8_without_calibration_texts_is_one_clear_error(student, tmp_path):
    with pytest.raises(QuantizeError, match="onnx_int8_static needs calibration texts"):
        build("onnx_int8_static", student, tmp_path)
    with pytest.raises(QuantizeError, match="onnx_int8_static needs calibration texts"):
        build("onnx_int8_static", student, tmp_path, calibration=Calibration([], lambda texts: {}))


def test_mpnet_exports_without_token_type_ids(tmp_path, texts):
    raw = make_tiny_model(tmp_path / "mpnet", arch="mpnet")
    folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), tmp_path / "student",
                               max_length=32)
    onnx = open_classifier(build("onnx_fp32", folder, tmp_path / "q"))
    assert "token_type_ids" not in onnx.model.inputs
    np.testing.assert_allclose(onnx.predict_logits(texts[:4]), open_classifier(folder).predict_logits(texts[:4]),
                               atol=1e-4)


def test_check_accepts_within_tolerance_and_rejects_beyond():
    labels = np.array([0, 1] * 50)
    student_preds = labels.copy()
    student_preds[:10] = 1 - student_preds[:10]  # student: 0.90
    slightly_worse = student_preds.copy()
    slightly_worse[10] = 1 - slightly_worse[10]  # 0.89: one point below
    much_worse = student_preds.copy()
    much_worse[10:15] = 1 - much_worse[10:15]  # 0.85
    ok = check("onnx_int8", slightly_worse, student_preds, labels, max_accuracy_drop=0.01, size_mb=1, student_size_mb=4)
    bad = check("onnx_int8", much_worse, student_preds, labels, max_accuracy_drop=0.01, size_mb=1, student_size_mb=4)
    assert ok.accepted and ok.accuracy_drop == pytest.approx(0.01) and ok.agreement_with_student == 0.99
    assert not bad.accepted and bad.accuracy_drop == pytest.approx(0.05)
    assert "drop +0.0500, tolerance 0.01" in bad.reason


def test_quantizing_leaves_the_process_logging_alone(student, tmp_path, caplog):
    """ONNX Runtime's pre-processing hint is dropped for the quantize call only; later warnings are heard."""
    root = logging.getLogger()
    level = root.level
    with caplog.at_level(logging.WARNING):
        build("onnx_int8", student, tmp_path / "q")
        assert "pre-processing" not in caplog.text
        logging.getLogger("elsewhere").warning("still heard")
        logging.warning("root too")
    assert root.level == level and not root.filters
    assert "still heard" in caplog.text and "root too" in caplog.text


def test_register_serves_onnx_fp32_where_quantize_rejected_the_configured_variant(caplog):
    from distilops.config import RegisterConfig
    from distilops.errors import RegistryError
    from distilops.release.registry import serving_variants

    wanted = RegisterConfig().serving.model_dump()
    cpu = wanted["cpu"]  # the default CPU variant, whichever int8 scheme that is
    assert cpu in ("onnx_int8", "onnx_int8_static")
    checks = {"onnx_fp32": {"accepted": True}, cpu: {"accepted": False, "reason": "dropped 3 points"},
              "onnx_fp16": {"accepted": True}}
    with caplog.at_level(logging.WARNING, logger="distilops.release.registry"):
        plan = serving_variants(wanted, checks)
    assert plan == {"cpu": "onnx_fp32", "gpu": "onnx_fp16"}
    assert f"cpu variant {cpu} is not registered: dropped 3 points. onnx_fp32 serves instead" in caplog.text
    assert serving_variants(wanted, {**checks, cpu: {"accepted": True}}) == {"cpu": cpu, "gpu": "onnx_fp16"}
    with pytest.raises(RegistryError, match="add onnx_fp32 to quantize.variants"):
        serving_variants(wanted, {cpu: {"accepted": False, "reason": "x"}})
    with pytest.raises(RegistryError, match="register.serving.cpu must name a variant"):
        serving_variants({"cpu": "", "gpu": "onnx_fp16"}, checks)


def test_the_teacher_exports_to_onnx_and_agrees_with_itself_in_pytorch(student, texts, tmp_path):
    """The export agrees with the PyTorch teacher on every text; its accuracy is measured against the texts' own
    labels (one flipped, so no model scores 1.0 and a check that compared predictions with themselves fails)."""
    teacher = Path(shutil.copytree(student, tmp_path / "teacher"))  # a trained model: no near-ties to flip
    write_meta(teacher, role="teacher", source_model="tiny")
    folder = export_teacher(teacher, tmp_path / "teacher_onnx")
    meta = read_meta(folder)
    assert (meta["format"], meta["variant"], meta["role"], meta["source_model"]) == ("onnx", TEACHER_VARIANT,
                                                                                     "teacher", "tiny")
    exported = open_classifier(folder)
    assert exported.format == "onnx" and exported.labels == open_classifier(teacher).labels
    onnx_logits = exported.predict_logits_batched(texts, 16)
    torch_logits = open_classifier(teacher).predict_logits_batched(texts, 16)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    frame = make_reviews(n_movies=20, per_movie=5)
    frame = frame[frame["category"] != "plot"]
    assert frame["text"].tolist() == texts  # the same texts, in the same order, with their labels
    labels = (frame["category"] == "fresh").astype(int).to_numpy().copy()
    labels[0] = 1 - torch_logits[0].argmax()  # the teacher is wrong on the first text
    expected = float((torch_logits.argmax(-1) == labels).mean())
    result = check_teacher(onnx_logits.argmax(-1), torch_logits.argmax(-1), labels,
                           size_mb=weights_size_mb(folder), teacher_size_mb=weights_size_mb(teacher))
    assert result.accepted and result.agreement_with_teacher == 1.0 and expected < 1.0
    assert result.accuracy == result.teacher_accuracy == pytest.approx(expected)
    assert result.as_dict()["variant"] == TEACHER_VARIANT and result.size_mb > 0


def test_the_teacher_export_is_refused_below_0999_agreement():
    labels = np.array([0, 1] * 500)
    one_flip, two_flips = labels.copy(), labels.copy()
    one_flip[0] = 1
    two_flips[:2] = 1 - two_flips[:2]
    ok = check_teacher(one_flip, labels, labels, size_mb=1, teacher_size_mb=1)
    bad = check_teacher(two_flips, labels, labels, size_mb=1, teacher_size_mb=1)
    assert ok.accepted and ok.agreement_with_teacher == 0.999
    assert not bad.accepted and bad.agreement_with_teacher == 0.998
    assert bad.reason == ("agreement with the PyTorch teacher 0.9980 on 1000 test texts (needs >= 0.999): not "
                          "registered, so releases carry no shadow model")


def test_register_skips_a_refused_teacher_export_with_its_reason(caplog):
    from distilops.config import RegisterConfig
    from distilops.pipeline.evaluate import model_key
    from distilops.release.registry import Planned, release_plan

    cpu = RegisterConfig().serving.cpu  # the default CPU variant, whichever int8 scheme that is
    served = {cpu: {"accepted": True}, "onnx_fp16": {"accepted": True}}
    teacher = Planned(TEACHER_VARIANT, Path("models/teacher_onnx"), "teacher", "", "teacher")

    def plan(checks: dict) -> list[tuple[str, str, str, str]]:
        planned = release_plan(RegisterConfig().serving.model_dump(), {**served, **checks}, student=Path("s"),
                               quantized=Path("q"), teacher=teacher, teacher_check="teacher_onnx",
                               evaluated_as=model_key)
        return [(p.variant, p.role, p.device, p.evaluated_as) for p in planned]

    released = [("student", "reference", "", "student"), (cpu, "serving", "cpu", f"student_{cpu}"),
                ("onnx_fp16", "serving", "gpu", "student_onnx_fp16")]
    with caplog.at_level(logging.WARNING, logger="distilops.release.registry"):
        assert plan({"teacher_onnx": {"accepted": False, "reason": "agreement 0.9980"}}) == released
        assert plan({}) == released
    assert "teacher's ONNX export is not registered: agreement 0.9980. This release carries no shadow" in caplog.text
    assert "not built by the quantize stage" in caplog.text
    assert plan({"teacher_onnx": {"accepted": True, "reason": "ok"}}) == [
        *released, (TEACHER_VARIANT, "teacher", "", "teacher")]
