"""DVC stage `evaluate`: teacher, student and every quantized student side by side, on the test split and
on every set in `evaluate.extra_sets` (by default the long-text set): quality with 95% intervals
(accuracy, macro F1, agreement with the teacher, retention, McNemar vs the teacher) and cost (size,
parameters, batch-1 latency, batch-32 throughput on short and on long texts), with ratios to the teacher.
Long texts are read in windows (`window_overlap`, `max_windows`), as the served model reads them.
Each ONNX student also gets a "reference": its test-split answers as serving/fidelity.py bins them (label
mix, confidence, words, windows, agreement with the teacher [95%]), which the register stage stores in the
version's model folder for the service's drift gauges.
On every set in `evaluate.unlabeled_sets` (by default `general_text`: general_english sentences held apart
from transfer training; or a local file, e.g. logged requests), each model's agreement with the teacher [95%]."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import mlflow

from distilops import paths
from distilops.config import EvaluateConfig, UnlabeledSet, as_flat_dict, load_section
from distilops.errors import DataError
from distilops.pipeline.data import load_eval_set, read_labels, read_split
from distilops.pipeline.evaluate import TextSet, flat_metrics, log_summary, model_folders, run, write_plots
from distilops.pipeline.transfer import unlabeled_texts
from distilops.stage import read_json, run_stage, write_json
from distilops.tracking import log_dataset, stage_run

METRICS, PLOTS = paths.metrics_file("evaluate"), paths.plots_dir("evaluate")


def load_unlabeled(spec: UnlabeledSet, seed: int) -> TextSet:
    """An unlabelled set's texts, or one line naming the params key that points at a missing or empty source."""
    try:
        texts = unlabeled_texts(spec.source, spec.max_texts, seed)
    except DataError as exc:
        raise DataError(f"params.yaml: evaluate.unlabeled_sets '{spec.name}': {exc}") from None
    if not texts:
        raise DataError(f"params.yaml: evaluate.unlabeled_sets '{spec.name}': '{spec.source}' holds no texts")
    return TextSet(spec.source, texts)


def main() -> None:
    cfg = load_section(EvaluateConfig)
    label_names = read_labels()
    test = read_split("test")
    extra = {spec.name: load_eval_set(spec, label_names, cfg.seed) for spec in cfg.extra_sets}  # bad sets fail first
    unlabeled = {spec.name: load_unlabeled(spec, cfg.seed) for spec in cfg.unlabeled_sets}
    evaluation = run(cfg, model_folders(read_json(paths.metrics_file("quantize"))), test, extra, label_names,
                     unlabeled)
    write_json(METRICS, evaluation.report)
    write_plots(evaluation, label_names, PLOTS)
    with stage_run("evaluate", as_flat_dict(cfg)):
        log_dataset(test, "test", paths.PREPARED / "test.parquet", "evaluation")
        for spec in cfg.extra_sets:
            log_dataset(extra[spec.name], spec.name, spec.source, "evaluation")
        mlflow.log_metrics(flat_metrics(evaluation.report))
        mlflow.log_artifact(str(METRICS))
        for path in sorted(PLOTS.iterdir()):
            mlflow.log_artifact(str(path), artifact_path="plots")
    log_summary(evaluation.report)


if __name__ == "__main__":
    run_stage("evaluate", main)
