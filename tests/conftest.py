import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: one thread is as fast and never oversubscribes the CPU

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the default model's tokenizer and chat template."""
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def counting_rows() -> list[dict]:
    """Toy task data whose responses are 1-24 repetitions of one word: lengths vary, the content does not."""
    return [{"instruction": f"Repeat the word 'go' {n} times.", "output": " ".join(["go"] * n)} for n in range(1, 25)]


@pytest.fixture(scope="session")
def talking_model(tmp_path_factory, tiny_model, counting_rows) -> Path:
    """The tiny model after a short SFT on ``counting_rows``: it now ends its responses, at varied lengths."""
    from helpers import tiny_args

    from l3m import L3MTrainer

    out = tmp_path_factory.mktemp("talking") / "model"
    args = tiny_args(out, output_dir=str(out), max_steps=100, per_device_train_batch_size=8, learning_rate=1e-2)
    trainer = L3MTrainer(str(tiny_model), args=args, train_dataset=counting_rows * 4)
    trainer.train()
    trainer.save_model(str(out))
    return out
