"""DVC stage `evaluate`: teacher, student and every quantized student side by side, on the test split and
on every set in `evaluate.extra_sets` (by default the long-text set): quality with 95% intervals
(accuracy, macro F1, agreement with the teacher, retention, McNemar vs the teacher) and cost (size,
parameters, batch-1 latency, batch-32 throughput on short and on long texts), with ratios to the teacher.
Long texts are read in windows (`window_overlap`, `max_windows`), as the served model reads them.
Each ONNX student also gets a "reference": its test-split answers as serving/fidelity.py bins them (label
mix, confidence, words, windows, agreement with the teacher [95%]), which the register stage stores in the
version's model folder for the service's drift gauges."""

import mlflow

from distilops import paths
from distilops.config import EvaluateConfig, as_flat_dict, load_section
from distilops.pipeline.data import load_eval_set, read_labels, read_split
from distilops.pipeline.evaluate import flat_metrics, log_summary, model_folders, run, write_plots
from distilops.stage import read_json, run_stage, write_json
from distilops.tracking import log_dataset, stage_run

METRICS, PLOTS = paths.metrics_file("evaluate"), paths.plots_dir("evaluate")


def main() -> None:
    cfg = load_section(EvaluateConfig)
    label_names = read_labels()
    test = read_split("test")
    extra = {spec.name: load_eval_set(spec, label_names, cfg.seed) for spec in cfg.extra_sets}  # bad sets fail first
    evaluation = run(cfg, model_folders(read_json(paths.metrics_file("quantize"))), test, extra, label_names)
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
