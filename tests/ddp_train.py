"""A tiny teacher trained by `train` on 1 or N processes (tests/test_distributed.py runs it as a program):

    python tests/ddp_train.py MODEL_DIR OUT_DIR PROCESSES [KILL_RANK KILL_STEP]

N > 1 goes through pipeline/distributed.py's `session`, as a stage does: the script becomes torchrun, which runs it
N times. Rank 0 writes OUT_DIR/result.json (per-step losses, validation history, the final weights' sums). With
KILL_RANK and KILL_STEP, that rank SIGKILLs itself before that step on torchrun's first attempt only: the restart
must resume from the checkpoint to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_reviews  # noqa: E402

from distilops.config import Distributed  # noqa: E402
from distilops.pipeline.batching import tokenize  # noqa: E402
from distilops.pipeline.distributed import session  # noqa: E402
from distilops.pipeline.modeling import load_classifier, load_tokenizer  # noqa: E402
from distilops.pipeline.training import TrainSettings, cross_entropy_loss, seed_everything, train  # noqa: E402


def main() -> None:
    model_dir, out, processes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kill_rank, kill_step = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (-1, -1)
    with session(Distributed(processes=processes, restarts=1), "test") as world:
        seed_everything(0)
        tokenizer, model = load_tokenizer(str(model_dir)), load_classifier(str(model_dir))
        df = make_reviews(n_movies=30, per_movie=6)
        df = df[df["category"] != "plot"]
        labels = (df["category"] == "fresh").astype(int).to_numpy()
        data = tokenize(tokenizer, df["text"].tolist(), labels, max_length=32)
        # 151 training examples: the last batch of 7 is shared 4 + 3, so the loss weights matter
        train_data, val_data = data.subset(range(0, 151)), data.subset(range(151, len(data)))
        settings = TrainSettings(epochs=2, batch_size=16, learning_rate=3e-3, seed=1, checkpoint_every_steps=4,
                                 checkpoint_dir=out / "checkpoints", fingerprint={"test": 1}, progress=None)
        steps = {"n": 0}
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

        def loss_fn(net, batch):
            steps["n"] += 1
            if world.rank == kill_rank and first_attempt and steps["n"] == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return cross_entropy_loss(net, batch)

        result = train(model, train_data, val_data, tokenizer.pad_token_id, settings, loss_fn, world=world)
        if world.main:
            (out / "result.json").write_text(json.dumps({
                "world_size": world.size, "losses": result.losses, "history": result.history,
                "best_accuracy": result.best_accuracy, "best_step": result.best_step, "steps": result.steps,
                "resumed_from_step": result.resumed_from_step,
                "weights": {k: float(v.double().sum()) for k, v in model.state_dict().items()}}))


if __name__ == "__main__":
    main()
