"""`python evaluation/judge_agreement.py NAME=PIPELINE[@STEPS,GUIDANCE] ...`: digits accuracy of
exported pipelines under the CNN judge, the pixel SVM judge and k-NN readers on the same pixels.

Why: a gap that only one judge sees may be that judge's blind spot. Each pipeline is sampled
once with the benchmark's prompts and seeds; every judge reads the same images. Writes
evaluation/results/digits_judges/agreement.json (per-digit accuracies included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evaluation" / "results" / "digits_judges" / "agreement.json"


def parse(item: str) -> tuple[str, str, int, float]:
    name, _, rest = item.partition("=")
    path, _, call = rest.partition("@")
    steps, _, guidance = (call or "1,0").partition(",")
    return name, path, int(steps), float(guidance or 0)


def main(argv: list[str]) -> int:
    from sklearn.neighbors import KNeighborsClassifier

    from distillkit.benchmark.provenance import git_commit, machine
    from distillkit.data.digits import eval_prompts
    from distillkit.evaluation.digits_eval import load_judge
    from distillkit.evaluation.generate import generate_images, load_pipeline
    from distillkit.evaluation.metrics import judge_outputs, per_class_accuracy
    from distillkit.evaluation.pixel_judge import pooled_pixels, train_pixel_judge

    judge, split = load_judge()
    readers = {"svm_pool8": train_pixel_judge(split).predict}
    for k in (1, 3, 5):
        knn = KNeighborsClassifier(k).fit(pooled_pixels(split.train_images), split.train_labels)
        readers[f"knn{k}_pool8"] = lambda x, knn=knn: knn.predict(pooled_pixels(x))
    pairs = eval_prompts(100)
    prompts, labels = [p for p, _ in pairs], np.array([y for _, y in pairs])
    rows = {}
    for item in argv:
        name, path, steps, guidance = parse(item)
        images = generate_images(load_pipeline(path), prompts, steps=steps, guidance=guidance,
                                 seed=0, batch_size=100)  # fmt: skip
        reads = {"cnn": judge_outputs(judge, images)[1].numpy()}
        reads |= {key: np.asarray(read(images)) for key, read in readers.items()}
        rows[name] = {
            "pipeline": path, "steps": steps, "guidance": guidance,
            **{key: {"accuracy": float((p == labels).mean()),
                     "per_class": per_class_accuracy(torch.as_tensor(p), labels)}
               for key, p in reads.items()},
        }  # fmt: skip
        print(
            name, {k: round(v["accuracy"], 3) for k, v in rows[name].items() if isinstance(v, dict)}
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "commit": git_commit(), "samples": len(prompts)}
    result |= {"command": "python evaluation/judge_agreement.py " + " ".join(argv), "rows": rows}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
