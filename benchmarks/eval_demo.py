"""Score the embedded demo model on held-out synthetic scenes, with transformers and with molmocap.

Per scene: the short caption (exact match), up to three questions of different kinds (color, shape, count,
position, presence, word; exact answer) and one pointing request (a point counts as a hit inside its object's box).
Transformers (fp32, greedy `generate`) is the reference; molmocap runs each requested plan (a `--quant` plan or a
candidate of bench_int4_plans.py) from its own export, and its token ids are compared with the reference's item by
item. fp32 is the shipped export (models/demo/onnx); every other plan is exported afresh from the checkpoint into a
temporary folder (a second each), so no stale export is scored. Run from the repository root:

    python benchmarks/eval_demo.py --n 300 --quant fp32 int8 int4 int4-head8 --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conditions import conditions  # noqa: E402

from models.demo.scenes import HELD_OUT_SEED, make_scene  # noqa: E402
from models.demo.scoring import QA_KINDS, Item, eval_items, score_points  # noqa: E402

CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"
RESULTS = ROOT / "benchmarks" / "results"
MAX_NEW_TOKENS = 80


SHIPPED = ROOT / "models" / "demo" / "onnx"


def plan_names() -> tuple[str, ...]:
    """The plans the exporter can write and the candidate 4-bit plans (each one is evaluated from its own export)."""
    from bench_int4_plans import CANDIDATES

    from molmocap.export.plan import PLANS

    return tuple(dict.fromkeys([*PLANS, *CANDIDATES]))


def export_plan(name: str, into: Path) -> Path:
    """The demo checkpoint exported under plan `name` into `into`/<name> (fp32: the shipped export)."""
    from bench_int4_plans import plan_for

    from molmocap.export.exporter import export

    if name == "fp32":
        return SHIPPED
    return export(str(CHECKPOINT), into / name, quant=name, plan=plan_for(name))


class TransformersEngine:
    """The reference: the checkpoint in transformers, fp32, greedy decoding."""

    def __init__(self, checkpoint: Path) -> None:
        import torch
        from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

        torch.set_num_threads(2)
        self.torch = torch
        self.model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.processor = Molmo2Processor.from_pretrained(checkpoint)
        eos = self.model.generation_config.eos_token_id
        self.stop = set([eos] if isinstance(eos, int) else eos)

    @property
    def max_crops(self) -> int:
        return self.processor.image_processor.max_crops

    def answer(self, image, prompt: str) -> tuple[str, list[int]]:
        from models.demo.packing import single_prompt_inputs

        inputs = single_prompt_inputs(self.processor, image, prompt)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        ids = ids[:next((i for i, t in enumerate(ids) if t in self.stop), len(ids))]
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True), ids


class MolmocapEngine:
    """The exported model on the lean runtime."""

    def __init__(self, model_dir: Path, max_crops: int) -> None:
        from molmocap.runtime import Captioner

        self.captioner = Captioner.load(model_dir, threads=2)
        self.max_crops = max_crops

    def answer(self, image, prompt: str) -> tuple[str, list[int]]:
        r = self.captioner.generate(image, prompt, max_new_tokens=MAX_NEW_TOKENS, max_crops=self.max_crops)
        return r.text, list(r.token_ids)


def run_engine(name: str, answer: Callable, items: list[Item], progress: Callable[[str], None]) -> list[dict]:
    results = []
    start = time.perf_counter()
    for i, item in enumerate(items):
        text, ids = answer(item.scene.image, item.question.prompt)
        results.append({"seed": item.scene.seed, "kind": item.question.kind, "prompt": item.question.prompt,
                        "expected": item.question.answer, "text": text, "ids": ids})
        if (i + 1) % 100 == 0:
            progress(f"  {name}: {i + 1}/{len(items)} items, {time.perf_counter() - start:.0f} s")
    progress(f"  {name}: {len(items)} items in {time.perf_counter() - start:.0f} s")
    return results


def score(items: list[Item], results: list[dict]) -> dict:
    """Caption exact match, question accuracy (overall and per kind) and pointing hit rate of one engine."""
    correct = defaultdict(list)
    hits = total = 0
    for item, result in zip(items, results):
        q = item.question
        if q.kind == "point":
            h, t = score_points(item.scene, q, result["text"])
            hits, total = hits + h, total + t
        else:
            correct[q.kind].append(result["text"].strip() == q.answer)
    qa = [c for kind in QA_KINDS for c in correct[kind]]
    return {
        "caption_exact": sum(correct["caption"]) / len(correct["caption"]),
        "qa_accuracy": sum(qa) / len(qa),
        "point_hit_rate": hits / total,
        "attribute_accuracy": {kind: round(sum(correct[kind]) / len(correct[kind]), 4)
                               for kind in QA_KINDS if correct[kind]},
    }


def evaluate(seed: int, n: int, quants: list[str], progress: Callable[[str], None],
             transformers: bool = True) -> dict:
    """Score every engine on the same items; tokens are compared with transformers' (or, without it, with the fp32
    export's, which the slow tests hold to transformers' tokens on every item)."""
    scenes = [make_scene(seed + i) for i in range(n)]
    items = [item for scene in scenes for item in eval_items(scene)]
    progress(f"{len(items)} items from {n} held-out scenes (seeds {seed}..{seed + n - 1})")
    engines: dict[str, Callable] = {}
    if transformers:
        reference = TransformersEngine(CHECKPOINT)
        engines["transformers-fp32"], max_crops, ref_name = reference.answer, reference.max_crops, "transformers-fp32"
    else:
        from molmocap.runtime.manifest import read_manifest

        max_crops, ref_name = read_manifest(SHIPPED).preprocess["max_crops"], "molmocap-fp32"
    with tempfile.TemporaryDirectory() as exports:
        for quant in quants:
            engines[f"molmocap-{quant}"] = MolmocapEngine(export_plan(quant, Path(exports)), max_crops).answer
        outputs = {name: run_engine(name, answer, items, progress) for name, answer in engines.items()}
    scores = {name: score(items, results) for name, results in outputs.items()}
    ref_ids = [r["ids"] for r in outputs[ref_name]]
    report = {key: {name: round(s[key], 4) for name, s in scores.items()}
              for key in ("caption_exact", "qa_accuracy", "point_hit_rate")}
    report["attribute_accuracy"] = {name: s["attribute_accuracy"] for name, s in scores.items()}
    report["identical_to_transformers" if transformers else "identical_to_fp32"] = {
        name: round(sum(r["ids"] == ids for r, ids in zip(results, ref_ids)) / len(items), 4)
        for name, results in outputs.items() if name != ref_name}
    report["meta"] = {"seed": seed, "scenes": n, "items": len(items), "max_crops": max_crops,
                      "max_new_tokens": MAX_NEW_TOKENS, "reference": ref_name,
                      "date": datetime.date.today().isoformat()}
    report["mismatches"] = [
        {"engine": name, "seed": r["seed"], "prompt": r["prompt"], "expected": r["expected"], "got": r["text"]}
        for name, results in outputs.items() for r in results if r["text"].strip() != r["expected"]
        and r["kind"] != "point"][:50]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                        help="first held-out scene seed (default: %(default)s)")
    parser.add_argument("--n", type=int, default=300, help="number of scenes (default: %(default)s)")
    parser.add_argument("--quant", nargs="+", default=["fp32"], choices=plan_names(),
                        help="molmocap plans to evaluate (default: fp32)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="do not run transformers (the slow part); compare tokens with the fp32 export's")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if args.seed < HELD_OUT_SEED:
        parser.error(f"seeds below {HELD_OUT_SEED} are training scenes")
    if args.skip_transformers and "fp32" not in args.quant:
        parser.error("without transformers the fp32 export is the reference: add fp32 to --quant")

    progress = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    started = conditions("torch", "transformers")
    report = {**evaluate(args.seed, args.n, args.quant, progress, not args.skip_transformers), "conditions": started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"eval_demo-{report['meta']['date']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "mismatches"}))
        return
    for key in ("caption_exact", "qa_accuracy", "point_hit_rate", next(k for k in report if k.startswith("identical"))):
        print(f"{key:26s} " + "  ".join(f"{name} {value:.3f}" for name, value in report[key].items()))
    for name, per_kind in report["attribute_accuracy"].items():
        print(f"{'accuracy by kind':26s} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_kind.items()))
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
