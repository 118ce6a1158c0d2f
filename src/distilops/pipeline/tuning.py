"""Optuna-tuned distillation: temperature, alpha and learning rate (and optionally the cosine weight, the
layer-wise weights: TinyBERT's hidden-state MSE, MiniLM's attention KL, and the student's depth).

- Depth fixed (`search.student_layers: [0, 0]`): one objective, validation accuracy, with the median pruner.
- Depth searched (`search.student_layers: [2, 5]`): a multi-objective study. Each trial returns the student's
  agreement with its teacher on validation texts and on held-apart general text (maximised), and the served
  variant's batch-1 latency at its depth (minimised). Optuna's pruners do not support several objectives, so
  trials run in full; the cost stays bounded because `n_trials` is fixed, trials train on
  `trial_train_examples`, validate once at the end, and latency is measured once per depth before the trials
  (served_latency.py), not per trial. Every depth is enqueued once first, so each appears on the frontier;
  the distill stage then picks a point by `distill.choose` (frontier.py).

- TPE sampler seeded from `seed` (a resumed study or an extra worker derives its own seed, so it
  never replays the first trials); median pruner fed validation accuracy every `eval_every_steps`.
- Storage: an SQLite file by default, so an interrupted study resumes (`load_if_exists`) and runs
  only its missing trials; any SQLAlchemy URL (PostgreSQL) lets many workers share one study
  (`distilops tune`); every worker stops once the study holds `n_trials` finished trials.
  DISTILOPS_OPTUNA_STORAGE overrides `distill.storage`, so database passwords stay out of params.yaml.
  Heartbeats (`heartbeat_seconds`) mark a crashed worker's trial failed once it has been silent for
  three intervals; the next worker to start a trial retries it once with the same params.
- Each trial is a nested MLflow run under the stage's run; memory is released between trials.
- The study name is derived from the whole trial configuration and the inputs, so editing anything
  that changes a trial (search space, data, weight decay...) starts a new study instead of resuming
  one whose trials were run differently. The layer-wise weights are left out while off ([0, 0]), so
  studies from before they existed keep their names.
- The layer-wise terms need every layer of the teacher, which the cache does not hold: when a trial's
  weight is > 0 the teacher runs online on each batch (eval mode, no gradients). Student layer i learns
  teacher layer modeling.target_layer_map[i]; a trainable projection (TinyBERT's W_h) maps the student's
  width to the teacher's where they differ, trained with the student and then dropped.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from distilops import paths, stats
from distilops.config import DistillConfig
from distilops.errors import ConfigError, DivergedError, ModelError, StaleCacheError, TuningError
from distilops.hashing import json_sha256
from distilops.pipeline import served_latency, teacher_outputs
from distilops.pipeline.batching import Examples, concat, device, model_inputs, predict_logits, tokenize
from distilops.pipeline.data import read_labels, read_split
from distilops.pipeline.losses import UNLABELLED, LossParts, distillation_loss
from distilops.pipeline.modeling import (
    build_student,
    check_same_tokenizer,
    load_classifier,
    load_tokenizer,
    num_layers,
    target_layer_map,
)
from distilops.pipeline.training import LossFn, TrainSettings, seed_everything, train
from distilops.pipeline.transfer import tuning_texts
from distilops.serving.folder import read_meta
from distilops.settings import OPTUNA_STORAGE
from distilops.tracking import redact_uri

log = logging.getLogger(__name__)
STORAGE_ENV = OPTUNA_STORAGE.name
# A trial in these states is done: it counts towards n_trials, and a resumed study does not rerun it.
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
StudentFactory = Callable[[], torch.nn.Module]


@dataclass
class TrialParams:
    temperature: float
    alpha: float
    learning_rate: float
    cosine_weight: float = 0.0
    hidden_mse_weight: float = 0.0
    attention_weight: float = 0.0
    student_layers: int = 0  # searched depth; 0 = the configured student (depth fixed)

    @property
    def layer_wise(self) -> bool:
        """Whether a layer-wise term is on: the teacher then runs online."""
        return self.hidden_mse_weight > 0 or self.attention_weight > 0


# The layer-wise weights (search keys): while their range is [0, 0] they are left out of the study key.
LAYER_WEIGHTS = ("hidden_mse_weight", "attention_weight")
# A depth-searching study's objectives, in order (Optuna's directions below).
OBJECTIVES = ("val_agreement", "general_agreement", "latency_ms")
DIRECTIONS = ("maximize", "maximize", "minimize")
# The study's user attribute holding served_latency.measure's result (quartiles of each depth's and the teacher's
# latency, and each depth's paired speedup). Studies measured the PyTorch way kept theirs in "served_latency_ms":
# a resumed one measures again under this name, and its frontier is read with the new numbers.
LATENCY_ATTR = "served_latency"


def searches_depth(cfg: DistillConfig) -> bool:
    low, high = cfg.search.student_layers
    return high > low


def fixed_layers(cfg: DistillConfig) -> int:
    """The depth of a student built from the teacher while depth is not searched (0 = half the teacher's)."""
    return cfg.search.student_layers[0] or cfg.student_layers


def depths(cfg: DistillConfig) -> list[int]:
    low, high = cfg.search.student_layers
    return list(range(low, high + 1))


def suggest(trial: optuna.Trial, cfg: DistillConfig) -> TrialParams:
    space = cfg.search

    def pick(name: str, bounds: list[float], log: bool = False) -> float:
        low, high = bounds
        return low if low == high else trial.suggest_float(name, low, high, log=log)

    return TrialParams(
        temperature=pick("temperature", space.temperature),
        alpha=pick("alpha", space.alpha),
        learning_rate=pick("learning_rate", space.learning_rate, log=True),
        cosine_weight=pick("cosine_weight", space.cosine_weight),
        hidden_mse_weight=pick("hidden_mse_weight", space.hidden_mse_weight),
        attention_weight=pick("attention_weight", space.attention_weight),
        student_layers=trial.suggest_int("student_layers", *space.student_layers) if searches_depth(cfg) else 0,
    )


def params_of(trial: optuna.trial.FrozenTrial, cfg: DistillConfig) -> TrialParams:
    """A finished trial's parameters, filling fixed (equal-bound) values from the config."""
    space = cfg.search
    fixed = {f.name: getattr(space, f.name)[0] for f in fields(TrialParams) if f.name != "student_layers"}
    return TrialParams(**{f.name: trial.params.get(f.name, fixed.get(f.name, 0)) for f in fields(TrialParams)})


@dataclass
class LayerTargets:
    """What the layer-wise terms need beside the student: the teacher (run online), which teacher layer each
    student layer learns, and the projection of the student's width to the teacher's (None when equal)."""

    teacher: torch.nn.Module
    layer_map: list[int]
    projection: torch.nn.Linear | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # the parts since the last `log`, for MLflow
    batches: int = 0

    def record(self, parts: LossParts) -> None:
        """Add one batch's layer-wise parts, as tensors on the device: recording adds no sync of its own (train()
        already reads the loss back each step, for its finiteness check and the progress bar)."""
        for name in ("hidden_mse", "attention_kl"):
            self.sums[name] = self.sums.get(name, 0) + getattr(parts, name).detach()
        self.batches += 1

    def log(self, step: int) -> None:
        """Log the parts' means since the last call as MLflow metrics train_hidden_mse / train_attention_kl."""
        if self.batches:
            mlflow.log_metrics({f"train_{k}": float(v) / self.batches for k, v in self.sums.items()}, step=step)
        self.sums, self.batches = {}, 0


def check_layer_losses(teacher: torch.nn.Module, student: torch.nn.Module, *, attention: bool) -> None:
    """A clear error for a student the layer-wise terms cannot map to the teacher."""
    target_layer_map(num_layers(teacher), num_layers(student))  # at most the teacher's layers
    heads = (student.config.num_attention_heads, teacher.config.num_attention_heads)
    if attention and heads[0] != heads[1]:
        raise ModelError(f"the attention loss needs the student's attention heads ({heads[0]}) to equal the "
                         f"teacher's ({heads[1]}): set distill.search.attention_weight to [0, 0]")


def attention_dropout_off(model: torch.nn.Module) -> None:
    """No dropout on the student's attention probabilities: Hugging Face returns them after dropout, which is
    not a distribution to take a KL of. The attention-probability dropout is the one beside the query
    projection (BERT, RoBERTa, ELECTRA: query; MPNet: q; DistilBERT: q_lin)."""
    found = 0
    for module in model.modules():
        dropout = getattr(module, "dropout", None)
        if isinstance(dropout, torch.nn.Dropout) and any(hasattr(module, q) for q in ("query", "q", "q_lin")):
            dropout.p, found = 0.0, found + 1
    if found != num_layers(model):
        raise ModelError(f"found {found} attention-probability dropouts in {type(model).__name__} for "
                         f"{num_layers(model)} layers: the attention loss does not know this architecture")


def layer_targets(p: TrialParams, teacher: torch.nn.Module | None, student: torch.nn.Module) -> LayerTargets | None:
    """What `p`'s layer-wise terms need; None when they are off (then nothing is created: no random draw)."""
    if not p.layer_wise:
        return None
    if teacher is None:
        raise ModelError("the layer-wise losses need the teacher: pass it to run_study")
    check_layer_losses(teacher, student, attention=p.attention_weight > 0)
    if p.attention_weight > 0:
        for model in (teacher, student):  # SDPA attention returns no probabilities
            model.set_attn_implementation("eager")
        attention_dropout_off(student)
    widths = (student.config.hidden_size, teacher.config.hidden_size)
    projection = torch.nn.Linear(*widths) if p.hidden_mse_weight > 0 and widths[0] != widths[1] else None
    teacher.to(device()).eval()
    return LayerTargets(teacher, target_layer_map(num_layers(teacher), num_layers(student)), projection)


def distill_loss_fn(p: TrialParams, layers: LayerTargets | None = None) -> LossFn:
    """train()'s loss for parameters `p`; `layers` (from layer_targets) when a layer-wise term is on."""
    if p.layer_wise and layers is None:
        raise ModelError("the layer-wise losses need layer_targets(params, teacher, student)")

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        dev = next(model.parameters()).device
        inputs = model_inputs(batch, dev)
        out = model(**inputs, output_hidden_states=p.cosine_weight > 0 or p.hidden_mse_weight > 0,
                    output_attentions=p.attention_weight > 0)
        teacher_hidden_states = teacher_attentions = None
        if layers is not None:
            with torch.no_grad():  # the teacher only gives targets
                teacher = layers.teacher(**inputs, output_hidden_states=p.hidden_mse_weight > 0,
                                         output_attentions=p.attention_weight > 0)
            teacher_hidden_states, teacher_attentions = teacher.hidden_states, teacher.attentions
        parts = distillation_loss(
            out.logits, batch["teacher_logits"].to(dev), batch["labels"].to(dev),
            temperature=p.temperature, alpha=p.alpha, cosine_weight=p.cosine_weight,
            student_hidden=out.hidden_states[-1] if p.cosine_weight > 0 else None,
            teacher_hidden=batch["teacher_hidden"].to(dev) if p.cosine_weight > 0 else None,
            attention_mask=batch["attention_mask"].to(dev),
            hidden_mse_weight=p.hidden_mse_weight, attention_weight=p.attention_weight,
            student_hidden_states=out.hidden_states, student_attentions=out.attentions,
            teacher_hidden_states=teacher_hidden_states, teacher_attentions=teacher_attentions,
            layer_map=layers.layer_map if layers else None, projection=layers.projection if layers else None,
        )
        if layers is not None:
            layers.record(parts)
        return parts.total

    return loss_fn


# DistillConfig fields that do not change a trial's result: every other field is in the study key,
# so a field added later starts a new study by default instead of silently resuming a stale one.
NOT_IN_STUDY_KEY = frozenset({"n_trials", "final_epochs", "checkpoint_every_steps", "storage", "study_name",
                              "heartbeat_seconds", "choose", "distributed"})
DEPTH_SEARCH_KEYS = ("latency_calls", "general_texts")  # change trials only while depth is searched


def study_name_for(cfg: DistillConfig, inputs: dict) -> str:
    """'distill-<hash>' of the whole trial configuration and the inputs (teacher, data)."""
    if cfg.study_name:
        return cfg.study_name
    key = {**cfg.model_dump(exclude=set(NOT_IN_STUDY_KEY)), **inputs}
    # Off, the layer-wise weights change no trial: leaving them out keeps the names of studies made before them.
    key["search"] = {k: v for k, v in key["search"].items()
                     if not ((k in LAYER_WEIGHTS or k == "student_layers") and max(v) == 0)}
    if not searches_depth(cfg):  # nor do the depth search's settings while depth is fixed
        key = {k: v for k, v in key.items() if k not in DEPTH_SEARCH_KEYS}
    return "distill-" + json_sha256(key)[:12]


@dataclass
class DistillInputs:
    """Everything a trial needs, loaded once: teacher, tokenizer, student factory, data with cached targets."""

    teacher: torch.nn.Module
    tokenizer: object
    make_student: StudentFactory
    data: dict[str, Examples]
    fingerprint: dict  # teacher_outputs.fingerprint (+ the transfer texts' hash): what the study name depends on
    teacher_name: str
    study_name: str
    general: Examples | None = None  # held-apart general text with the teacher's logits (depth search only)

    @property
    def run_tags(self) -> dict[str, str]:
        """Lineage tags of the MLflow run that tunes or distills with these inputs."""
        return {"optuna_study": self.study_name, "teacher": self.teacher_name}


def load_inputs(cfg: DistillConfig, data_dir: Path = paths.PREPARED, teacher_dir: Path = paths.TEACHER,
                cache_dir: Path = paths.TEACHER_OUTPUTS) -> DistillInputs:
    """Teacher, tokenizer and the train/validation examples with the cached teacher outputs attached, and the
    study name they imply (seeds everything first: what the distill stage and every `distilops tune` run)."""
    seed_everything(cfg.seed)
    if not (cache_dir / "meta.json").exists():
        raise StaleCacheError(f"{cache_dir} holds no teacher outputs: run `dvc repro teacher_outputs` first")
    labels = read_labels(data_dir / "report.json")
    tokenizer = load_tokenizer(str(teacher_dir))
    teacher = load_classifier(str(teacher_dir))
    if cfg.student_model:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.student_model), cfg.student_model)

        def make_student() -> torch.nn.Module:
            return load_classifier(cfg.student_model, labels)
    else:
        def make_student() -> torch.nn.Module:
            return build_student(teacher, fixed_layers(cfg))

    with_hidden = cfg.search.cosine_weight[1] > 0
    layer_wise = any(getattr(cfg.search, name)[1] > 0 for name in LAYER_WEIGHTS)
    fingerprint = teacher_outputs.fingerprint(teacher_dir, data_dir / "report.json", cfg.max_length)
    data = {}
    for split in teacher_outputs.TEACHER_SPLITS:
        frame = read_split(split, data_dir)
        examples = tokenize(tokenizer, frame["text"], frame["label"], cfg.max_length)
        data[split] = teacher_outputs.attach(examples, cache_dir, split, expect=fingerprint, with_hidden=with_hidden)
    transfer = teacher_outputs.transfer_texts(cache_dir)
    if transfer:  # unlabelled texts the teacher labelled: trained on beside the labelled ones, soft targets only
        unlabelled = tokenize(tokenizer, transfer, [UNLABELLED] * len(transfer), cfg.max_length)
        data["train"] = concat(data["train"], teacher_outputs.attach(unlabelled, cache_dir, teacher_outputs.TRANSFER,
                                                                     expect=fingerprint, with_hidden=with_hidden))
        fingerprint = {**fingerprint, "transfer_sha256": teacher_outputs.transfer_sha256(transfer)}  # a new study
    if with_hidden and make_student().config.hidden_size != teacher.config.hidden_size:
        raise ModelError("the cosine loss needs the student's hidden size to equal the teacher's")
    general = None
    if searches_depth(cfg):
        check_depth_search(cfg, teacher)
        texts = tuning_texts(cfg.general_texts)
        general = tokenize(tokenizer, texts, [UNLABELLED] * len(texts), cfg.max_length)
        general.teacher_logits, _ = predict_logits(teacher, general, tokenizer.pad_token_id, desc="teacher: general")
    if layer_wise:  # fail before the first trial, not in it
        students = [build_student(teacher, d) for d in depths(cfg)] if searches_depth(cfg) else [make_student()]
        for student in students:
            check_layer_losses(teacher, student, attention=cfg.search.attention_weight[1] > 0)
    teacher_name = read_meta(teacher_dir).get("source_model", str(teacher_dir))  # e.g. all-MiniLM-L6-v2
    return DistillInputs(teacher, tokenizer, make_student, data, fingerprint, teacher_name,
                         study_name_for(cfg, fingerprint), general)


def check_depth_search(cfg: DistillConfig, teacher: torch.nn.Module) -> None:
    """A clear error for a depth range no student built from this teacher can span."""
    low, high = cfg.search.student_layers
    if cfg.student_model:
        raise ConfigError(f"params.yaml: distill.search.student_layers [{low}, {high}] searches students built from "
                          f"the teacher, but distill.student_model names '{cfg.student_model}': set one of them "
                          "aside (student_layers: [0, 0] keeps that model)")
    teacher_layers = num_layers(teacher)
    if low < 1 or high >= teacher_layers:
        raise ConfigError(f"params.yaml: distill.search.student_layers [{low}, {high}]: the teacher has "
                          f"{teacher_layers} layers, so depths run from 1 to {teacher_layers - 1} "
                          f"(e.g. [2, {teacher_layers - 1}])")
    if cfg.n_trials < len(depths(cfg)):
        raise ConfigError(f"params.yaml: distill.n_trials {cfg.n_trials} is fewer than the {len(depths(cfg))} depths "
                          f"searched ({low}-{high}): each depth gets at least one trial")


def redact(url: str) -> str:
    """A storage URL fit to print: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not an SQLAlchemy URL: drop any user:password@ all the same
        return redact_uri(url)


def storage_for(cfg: DistillConfig) -> RDBStorage:
    """RDB storage with heartbeats: a trial whose worker died is failed, then retried once."""
    url = OPTUNA_STORAGE.read() or cfg.storage
    if not url:
        paths.OPTUNA_DB.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{paths.OPTUNA_DB}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(url, heartbeat_interval=cfg.heartbeat_seconds,
                              grace_period=3 * cfg.heartbeat_seconds,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as exc:  # SQLAlchemy raises many types: bad URL, missing driver, refused login
            # The message may quote the URL, password included: say what failed, never print the secret.
            reason = str(exc).replace(url, redact(url))
            raise ConfigError(f"params.yaml: distill.storage: cannot open '{redact(url)}': "
                              f"{type(exc).__name__}: {reason}") from None


def trial_subset(n: int, size: int, seed: int) -> np.ndarray:
    """The same training subset for every trial, so trials differ only in their parameters."""
    if not size or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def free_memory() -> None:
    gc.collect()
    if device().type == "cuda":
        torch.cuda.empty_cache()


def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (Optuna's own log lines are turned down: this one is bar-safe)."""
    params = ", ".join(f"{k} {v:.3g}" for k, v in trial.params.items())
    if trial.state == optuna.trial.TrialState.COMPLETE and len(trial.values) > 1:
        outcome = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in zip(OBJECTIVES, trial.values, strict=True))
    elif trial.state == optuna.trial.TrialState.COMPLETE:
        outcome = f"val accuracy {trial.value:.4f}"
    else:
        outcome = f"{trial.state.name.lower()} at step {trial.user_attrs.get('steps', '?')}"
    log.info("trial %d: %s (%s)", trial.number, outcome, params)


def sampler_seed(seed: int, worker: int | None, trials_in_study: int) -> int:
    """The TPE seed of one run: `seed` itself for the pipeline's first run (a fresh study reproduces),
    else derived from (seed, worker, trials already in the study). Re-seeded as on its first run, a
    resumed study, or a second worker, would propose the parameters of the first trials again."""
    if worker is None and trials_in_study == 0:
        return seed
    worker_key = 0 if worker is None else worker + 1
    return int(np.random.SeedSequence([seed, worker_key, trials_in_study]).generate_state(1)[0])


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's complete trials, or a clear error when none completed (all pruned, diverged or failed)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        return complete
    diverged = sum(bool(t.user_attrs.get("diverged")) for t in study.trials)
    raise TuningError(
        f"study '{study.study_name}': none of its {len(study.trials)} trial(s) completed ({diverged} diverged, "
        f"the rest pruned or failed), so there are no parameters to train the final student with. Lower the top "
        f"of distill.search.learning_rate if trials diverge; raise distill.pruner_startup_trials or "
        f"distill.pruner_warmup_steps if they are pruned (either starts a new study); or raise distill.n_trials "
        f"to run more trials in this one.")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """A one-objective study's best trial (a clear error when no trial completed)."""
    complete_trials(study)
    return study.best_trial


def open_study(cfg: DistillConfig, *, study_name: str, storage: RDBStorage | str, worker: int | None) -> optuna.Study:
    """Create or resume the study: one objective with the median pruner (depth fixed), or the depth search's three
    with none; its TPE sampler seeded for this run (sampler_seed)."""
    by_depth = searches_depth(cfg)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_steps)
    objectives = {"directions": list(DIRECTIONS)} if by_depth else {"direction": "maximize"}
    study = optuna.create_study(study_name=study_name, storage=storage, pruner=None if by_depth else pruner,
                                load_if_exists=True, **objectives)
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(cfg.seed, worker, len(study.trials)))
    return study


@dataclass
class TrialRunner:
    """The study's objective: trains a fresh student per trial on the shared subset and scores it. Depth fixed:
    validation accuracy, reported to the pruner as it trains. Depth searched: agreement with the teacher on
    validation and general text, and the depth's served latency (measured once per study: `latency`)."""

    cfg: DistillConfig
    make_student: StudentFactory
    subset: Examples  # the training examples every trial trains on (trial_subset)
    val_data: Examples
    pad_id: int
    study_name: str
    worker: int | None = None
    teacher: torch.nn.Module | None = None
    general: Examples | None = None
    latency: dict = field(default_factory=dict)  # served_latency.measure's result (depth search)

    @property
    def by_depth(self) -> bool:
        return searches_depth(self.cfg)

    @property
    def steps_per_trial(self) -> int:
        return -(-len(self.subset) // self.cfg.batch_size) * self.cfg.trial_epochs

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float, float]:
        params = suggest(trial, self.cfg)
        seed_everything(self.cfg.seed)
        student = build_student(self.teacher, params.student_layers) if params.student_layers else self.make_student()
        layers = layer_targets(params, self.teacher, student)  # None (and nothing drawn) while the terms are off
        # Trials keep no checkpoints: a trial cut short is failed and retried whole (heartbeats). A depth search
        # validates once at the end: nothing prunes its trials.
        settings = TrainSettings.from_config(self.cfg, epochs=self.cfg.trial_epochs, learning_rate=params.learning_rate,
                                             eval_every_steps=0 if self.by_depth else self.cfg.eval_every_steps,
                                             checkpoint_every_steps=0, progress=f"trial {trial.number}")
        reports: list[tuple[int, float]] = []
        started = time.perf_counter()
        trial.set_user_attr("worker", -1 if self.worker is None else self.worker)  # which process ran it, for logs
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                              tags={"optuna_study": self.study_name, "optuna_trial": str(trial.number)}):
            mlflow.log_params(vars(params))
            try:
                result = train(student, self.subset, self.val_data, self.pad_id, settings,
                               distill_loss_fn(params, layers), self.on_eval(trial, layers, reports),
                               extra=layers.projection if layers else None)
                mlflow.set_tag("state", "complete")
                return self.score(trial, student, params, result.best_accuracy)
            except optuna.TrialPruned:
                mlflow.set_tag("state", "pruned")
                raise
            except DivergedError as exc:  # a learning rate too high for this model is a bad setting, not a crash
                mlflow.set_tag("state", "diverged")
                trial.set_user_attr("diverged", True)  # not the pruner's doing: no time saved by it
                raise optuna.TrialPruned(str(exc)) from exc
            finally:
                self.record_cost(trial, time.perf_counter() - started, reports[-1][0] if reports else 0)
                del student
                free_memory()

    def on_eval(self, trial: optuna.Trial, layers: LayerTargets | None,
                reports: list[tuple[int, float]]) -> Callable[[int, float], None]:
        """train()'s callback: log each validation, and (depth fixed) report it to the pruner, which may stop
        the trial."""
        def report_or_prune(step: int, acc: float) -> None:
            reports.append((step, acc))
            mlflow.log_metric("val_accuracy", acc, step=step)
            if layers is not None:
                layers.log(step)
            if self.by_depth:
                return
            trial.report(acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (val accuracy {acc:.4f})")
        return report_or_prune

    def score(self, trial: optuna.Trial, student: torch.nn.Module, params: TrialParams,
              val_accuracy: float) -> float | tuple[float, float, float]:
        """The trial's value(s): validation accuracy, or (depth searched) the three objectives, with its speedup
        and accuracy kept on the trial for the frontier."""
        if not self.by_depth:
            return val_accuracy
        depth = str(params.student_layers)
        values = (agreement(student, self.val_data, self.pad_id), agreement(student, self.general, self.pad_id),
                  served_latency.latency_ms(self.latency, depth))
        speedup = served_latency.speedup(self.latency, depth)
        trial.set_user_attr("val_accuracy", val_accuracy)
        trial.set_user_attr("speedup", speedup)
        mlflow.log_metrics({**dict(zip(OBJECTIVES, values, strict=True)), "speedup": speedup})
        return values

    def record_cost(self, trial: optuna.Trial, seconds: float, steps_done: int) -> None:
        """What the trial cost, for pruning_summary: its seconds, the steps it ran and the steps it would have run."""
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("steps", steps_done)
        trial.set_user_attr("planned_steps", self.steps_per_trial)
        mlflow.log_metrics({"trial_seconds": seconds, "trial_steps": steps_done})


def run_study(cfg: DistillConfig, make_student: StudentFactory, train_data: Examples, val_data: Examples,
              pad_id: int, *, study_name: str, storage: RDBStorage | str, worker: int | None = None,
              teacher: torch.nn.Module | None = None, tokenizer=None, general: Examples | None = None) -> optuna.Study:
    """Create or resume the study and run the trials still missing (complete or pruned count as done).

    `worker` (0, 1, ...) marks an extra worker sharing the study: its sampler gets its own seed,
    or every worker would propose the same first trials. `teacher` runs online when a trial's
    layer-wise weight is > 0, and builds each trial's student when depth is searched; `general`
    (held-apart general text with the teacher's logits) is then the second objective's data.
    """
    by_depth = searches_depth(cfg)
    if by_depth and (teacher is None or general is None or tokenizer is None):
        raise ModelError("a depth search needs the teacher, its tokenizer and the general texts (run_study)")
    study = open_study(cfg, study_name=study_name, storage=storage, worker=worker)
    latency: dict = {}
    if by_depth:
        latency = depth_latency(study, cfg, teacher, tokenizer, served_latency.median_text(val_data.input_ids))
        enqueue_depths(study, cfg)
    # Optuna fails stale trials only when a new trial starts: a complete study would keep a dead
    # worker's trial RUNNING for ever. Fail it now (its retry is queued, run if trials remain).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    done = [t for t in study.trials if t.state in FINISHED_STATES]
    remaining = cfg.n_trials - len(done)
    log.info("study '%s': %d trial(s) done, %d to run", study_name, len(done), max(remaining, 0))
    subset = train_data.subset(trial_subset(len(train_data), cfg.trial_train_examples, cfg.seed))
    objective = TrialRunner(cfg, make_student, subset, val_data, pad_id, study_name, worker, teacher, general, latency)
    if remaining > 0:
        # Other workers may be filling the same study: stop once it holds n_trials finished trials.
        enough = MaxTrialsCallback(cfg.n_trials, states=FINISHED_STATES)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # log_trial says the same, bar-safe
        study.optimize(objective, n_trials=remaining, gc_after_trial=True, callbacks=[enough, log_trial])
    return study


def tune(cfg: DistillConfig, inputs: DistillInputs, *, worker: int | None = None) -> optuna.Study:
    """Run the study's missing trials on `inputs`, in the configured storage: what `dvc repro distill` runs
    before training the final student, and what each `distilops tune` worker runs alone."""
    return run_study(cfg, inputs.make_student, inputs.data["train"], inputs.data["validation"],
                     inputs.tokenizer.pad_token_id, study_name=inputs.study_name, storage=storage_for(cfg),
                     worker=worker, teacher=inputs.teacher, tokenizer=inputs.tokenizer, general=inputs.general)


def agreement(model: torch.nn.Module, data: Examples, pad_id: int) -> float:
    """Share of `data` on which `model`'s label is its teacher's (data.teacher_logits)."""
    logits, _ = predict_logits(model, data, pad_id)
    return stats.agreement(logits.argmax(-1), data.teacher_logits.argmax(-1))


def depth_latency(study: optuna.Study, cfg: DistillConfig, teacher: torch.nn.Module, tokenizer,
                  input_ids: list[int]) -> dict:
    """Each searched depth's served latency and the teacher's, measured once per study and kept in it, so a
    resumed study or another worker compares trials on the same numbers."""
    stored = study.user_attrs.get(LATENCY_ATTR, {})
    wanted = [str(d) for d in depths(cfg)] + [served_latency.TEACHER]
    if all(k in stored.get("latency_ms", {}) for k in wanted):
        return stored
    measured = served_latency.measure(teacher, tokenizer, depths(cfg), input_ids, calls=cfg.latency_calls,
                                      max_length=cfg.max_length)
    study.set_user_attr(LATENCY_ATTR, measured)
    return measured


def enqueue_depths(study: optuna.Study, cfg: DistillConfig) -> None:
    """One trial per depth not yet in the study (its other parameters sampled), so every depth is on the
    frontier before the sampler starts choosing."""
    seen = {t.params.get("student_layers", t.system_attrs.get("fixed_params", {}).get("student_layers"))
            for t in study.trials}
    for depth in depths(cfg):
        if depth not in seen:
            study.enqueue_trial({"student_layers": depth}, skip_if_exists=True)


def pruning_summary(study: optuna.Study) -> dict:
    """How many trials were pruned and the training time that saved (estimated from each trial's speed).

    A diverged trial is recorded as pruned but saved nothing: it could not have gone on, and when it
    diverged before its first report its speed is unknown."""
    trials = [t for t in study.trials if "seconds" in t.user_attrs]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    diverged = [t for t in pruned if t.user_attrs.get("diverged")]
    saved = 0.0
    for t in pruned:
        if t.user_attrs.get("diverged"):
            continue
        steps = max(t.user_attrs.get("steps", 0), 1)
        per_step = t.user_attrs["seconds"] / steps
        saved += per_step * max(t.user_attrs.get("planned_steps", steps) - steps, 0)
    spent = sum(t.user_attrs["seconds"] for t in trials)
    return {
        "trials": len(study.trials),
        "trials_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        "trials_pruned": len(pruned) - len(diverged),
        "trials_diverged": len(diverged),
        "tuning_seconds": round(spent, 1),
        "pruning_seconds_saved": round(saved, 1),
        "pruning_time_saved_fraction": round(saved / (spent + saved), 3) if spent + saved else 0.0,
    }
