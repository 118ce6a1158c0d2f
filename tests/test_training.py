"""The training loop: dynamic padding, exact resume after an interruption, teacher-output cache."""

import traceback

import numpy as np
import pytest
import torch
from tiny import make_reviews, make_tiny_model
from tqdm.auto import tqdm

from distilops.errors import DivergedError, StaleCacheError
from distilops.pipeline.batching import accuracy, length_grouped_batches, make_collate, tokenize
from distilops.pipeline.modeling import load_classifier, load_tokenizer
from distilops.pipeline.teacher_outputs import attach, compute
from distilops.pipeline.training import TrainSettings, cross_entropy_loss, seed_everything, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("teacher"), layers=2)
    tokenizer = load_tokenizer(str(folder))
    df = make_reviews(n_movies=30, per_movie=6)
    df = df[df["category"] != "plot"]
    labels = (df["category"] == "fresh").astype(int).to_numpy()
    data = tokenize(tokenizer, df["text"].tolist(), labels, max_length=32)
    return folder, tokenizer, data


def test_batches_are_padded_to_their_own_longest_text():
    batch = make_collate(pad_id=0)([{"input_ids": [2, 5, 3], "label": 1}, {"input_ids": [2, 3], "label": 0}])
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1000).tolist()
    batches = length_grouped_batches(lengths, 32, seed=3)
    assert len(batches) == -(-1000 // 32)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 32, seed=3)  # deterministic: resume depends on it
    assert batches != length_grouped_batches(lengths, 32, seed=4)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = np.array_split(rng.permutation(1000), len(batches))
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.7 * padded_random


def settings(tmp_path, **kw) -> TrainSettings:
    base = dict(epochs=2, batch_size=16, learning_rate=3e-3, seed=1, checkpoint_every_steps=3,
                checkpoint_dir=tmp_path / "ckpt", fingerprint={"test": 1}, progress=None)
    return TrainSettings(**{**base, **kw})


def test_training_learns_the_fixture_task(tiny, tmp_path):
    folder, tokenizer, data = tiny
    seed_everything(0)
    model = load_classifier(str(folder))
    before = accuracy(model, data, tokenizer.pad_token_id)
    result = train(model, data, data, tokenizer.pad_token_id, settings(tmp_path, epochs=4))
    assert result.best_accuracy > max(before, 0.8)
    assert accuracy(model, data, tokenizer.pad_token_id) == pytest.approx(result.best_accuracy)


def test_an_interrupted_run_resumes_exactly(tiny, tmp_path):
    folder, tokenizer, data = tiny
    pad = tokenizer.pad_token_id

    seed_everything(0)
    reference = load_classifier(str(folder))
    train(reference, data, data, pad, settings(tmp_path / "ref"))

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # after the checkpoint at step 6
            raise KeyboardInterrupt
        return cross_entropy_loss(model, batch)

    seed_everything(0)
    model = load_classifier(str(folder))
    with pytest.raises(KeyboardInterrupt):
        train(model, data, data, pad, settings(tmp_path), loss_fn=crashing_loss)
    seed_everything(123)  # the resumed process starts with other random state
    model = load_classifier(str(folder))
    result = train(model, data, data, pad, settings(tmp_path))
    assert result.resumed_from_step == 6
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_an_extra_module_of_the_loss_is_trained_and_resumed_with_the_model(tiny, tmp_path):
    """`extra` (the layer-wise loss's projection) is optimised, clipped and checkpointed with the model."""
    folder, tokenizer, data = tiny
    pad = tokenizer.pad_token_id
    calls = {"n": 0}

    def run(path, crash_at=0):
        seed_everything(0)
        model, extra = load_classifier(str(folder)), torch.nn.Linear(2, 2)
        start = extra.weight.detach().clone()

        def loss_fn(model, batch):  # the logits through the extra layer
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
            return torch.nn.functional.cross_entropy(extra(logits), batch["labels"])

        return model, extra, start, lambda: train(model, data, data, pad, settings(path), loss_fn, extra=extra)

    reference, ref_extra, start, go = run(tmp_path / "ref")
    go()
    assert not torch.equal(ref_extra.weight, start)  # in the optimizer
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, crash_at=8)[3]()  # after the checkpoint at step 6
    model, extra, _, go = run(tmp_path)
    assert go().resumed_from_step == 6
    assert torch.allclose(extra.weight, ref_extra.weight, atol=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny, tmp_path):
    folder, tokenizer, data = tiny
    model = load_classifier(str(folder))
    train(model, data, data, tokenizer.pad_token_id, settings(tmp_path, epochs=1))
    result = train(load_classifier(str(folder)), data, data, tokenizer.pad_token_id,
                   settings(tmp_path, epochs=1, fingerprint={"test": 2}))
    assert result.resumed_from_step == 0


def test_teacher_outputs_are_cached_and_checked(tiny, tmp_path):
    folder, tokenizer, data = tiny
    model = load_classifier(str(folder))
    meta = {"teacher": "abc", "data_hash": "d1", "max_length": 32}
    compute(model, {"train": data}, tokenizer.pad_token_id, tmp_path / "cache", batch_size=7,
            hidden_states=True, meta=meta)
    fresh = tokenize(tokenizer, [tokenizer.decode(ids, skip_special_tokens=True) for ids in data.input_ids],
                     data.labels, 32)
    attached = attach(fresh, tmp_path / "cache", "train", expect=meta, with_hidden=True)
    direct = model(input_ids=torch.tensor([data.input_ids[0]]), output_hidden_states=True)
    assert np.allclose(attached.teacher_logits[0], direct.logits[0].detach().numpy(), atol=1e-5)
    assert np.allclose(attached.teacher_hidden[0], direct.hidden_states[-1][0].detach().numpy(), atol=1e-2)
    assert [len(h) for h in attached.teacher_hidden] == [len(ids) for ids in data.input_ids]
    with pytest.raises(StaleCacheError, match="data_hash"):
        attach(fresh, tmp_path / "cache", "train", expect={**meta, "data_hash": "d2"}, with_hidden=False)
    with pytest.raises(StaleCacheError, match="no teacher outputs"):
        attach(fresh, tmp_path / "empty", "train", expect=meta, with_hidden=False)


def test_a_diverging_run_stops_with_a_clear_error(tiny, tmp_path):
    folder, tokenizer, data = tiny
    model = load_classifier(str(folder))

    def exploding(model, batch):
        return cross_entropy_loss(model, batch) * float("nan")

    with pytest.raises(DivergedError, match="non-finite loss .* at step 1"):
        train(model, data, data, tokenizer.pad_token_id, settings(tmp_path), loss_fn=exploding)


def test_half_precision_checkpoints_load_as_fp32(tmp_path):
    folder = make_tiny_model(tmp_path / "half")
    load_classifier(str(folder)).half().save_pretrained(folder)
    assert next(load_classifier(str(folder)).parameters()).dtype == torch.float32


@pytest.mark.parametrize("stop", [KeyboardInterrupt, DivergedError])
def test_the_progress_bar_is_closed_when_a_run_is_cut_short(tiny, tmp_path, stop):
    """A pruned trial, a divergence or Ctrl-C: the bar must not stay open under the next trial's."""
    folder, tokenizer, data = tiny

    open_when_stopped = []

    def interrupt(step: int, acc: float) -> None:
        open_when_stopped.extend(bar for bar in tqdm._instances if bar.desc == "cut short")
        raise stop("stopped")

    with pytest.raises(stop) as cut:
        train(load_classifier(str(folder)), data, data, tokenizer.pad_token_id,
              settings(tmp_path, progress="cut short", eval_every_steps=2, checkpoint_dir=None), on_eval=interrupt)
    # `cut` holds the traceback, so train's frames (and the bar they reference) are still alive: a bar closed
    # now was closed by train itself, not by garbage collection.
    assert str(cut.value) == "stopped" and "train" in [frame.name for frame in traceback.extract_tb(cut.tb)]
    assert len(open_when_stopped) == 1
    assert not [bar for bar in tqdm._instances if bar.desc == "cut short"]
