"""What the demo model's image tokens encode: a fresh linear probe on frozen features, per attribute.

For every image token mostly covered by one object (targets as in `models/demo/grounding.py`), the checkpoint's
pooled image features are read without gradients, a linear classifier is fitted for the object's color and for its
shape on training scenes, and scored on held-out scenes. Low shape accuracy with high color accuracy means the vision
tower, not the language model, limits the captions. Run from the repository root:

    python benchmarks/probe_demo_features.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conditions import conditions  # noqa: E402

from models.demo.grounding import token_classes  # noqa: E402
from models.demo.scenes import COLORS, HELD_OUT_SEED, SHAPES, make_scene  # noqa: E402

CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_SEED = 500_000  # training-range scenes, beyond the ones the shipped run saw
TEST_SEED = HELD_OUT_SEED + 2000
N_SHAPED = len(SHAPES) * len(COLORS)  # classes 1..N_SHAPED are colored shapes


def object_tokens(model, processor, seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, hidden] of the tokens covered by a shape, and their colored-shape class (0-based)."""
    features, classes = [], []
    for seed in seeds:
        scene = make_scene(seed)
        inputs = processor.image_processor(images=[scene.image], return_tensors="pt")
        with torch.no_grad():
            pooled = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"]).pooler_output[0]
        labels = token_classes(scene, processor.image_processor)
        shaped = (labels > 0) & (labels <= N_SHAPED)
        features.append(pooled[shaped])
        classes.append(labels[shaped] - 1)
    return torch.cat(features), torch.cat(classes)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   steps: int = 500) -> tuple[float, float]:
    """(train, held-out) accuracy of a linear classifier fitted with Adam on standardized features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return ((linear(x_train).argmax(1) == y_train).float().mean().item(),
                (linear(x_test).argmax(1) == y_test).float().mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-scenes", type=int, default=300, help="scenes to fit on (default: %(default)s)")
    parser.add_argument("--test-scenes", type=int, default=100, help="held-out scenes (default: %(default)s)")
    args = parser.parse_args()
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    started = conditions("torch", "transformers")
    torch.manual_seed(0)
    model = Molmo2ForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    processor = Molmo2Processor.from_pretrained(CHECKPOINT)
    x_train, y_train = object_tokens(model, processor, range(TRAIN_SEED, TRAIN_SEED + args.train_scenes))
    x_test, y_test = object_tokens(model, processor, range(TEST_SEED, TEST_SEED + args.test_scenes))
    report = {"tokens": {"train": len(y_train), "held_out": len(y_test)},
              "chance": {"shape": 1 / len(SHAPES), "color": 1 / len(COLORS)}}
    for name, attribute in (("shape", lambda y: y // len(COLORS)), ("color", lambda y: y % len(COLORS))):
        train_acc, test_acc = probe_accuracy(x_train, attribute(y_train), x_test, attribute(y_test))
        report[name] = {"train": round(train_acc, 4), "held_out": round(test_acc, 4)}
        print(f"{name}: linear probe accuracy {train_acc:.3f} on training tokens, {test_acc:.3f} held out")
    report["date"] = datetime.date.today().isoformat()
    report["conditions"] = started
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"probe_demo_features-{report['date']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['tokens']['train']} training and {report['tokens']['held_out']} held-out object tokens; "
          f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
