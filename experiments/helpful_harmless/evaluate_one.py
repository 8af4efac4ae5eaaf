"""Evaluate one more checkpoint exactly as ``run.py`` evaluates its models, against one of a run's points.

Why: to add a model to a finished run (say, an MM trained for more steps) without re-running it. The held-out
references, the evaluation prompts, the reward models, the scales and the constraint point all come from the
run's ``results.json``, and the sampling settings from its preset.

    .venv/bin/python experiments/helpful_harmless/evaluate_one.py MODEL_DIR --results RESULTS_DIR --point P1 \
        --name "MM@P1, 48 steps" [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--results", required=True, help="a run's results folder (with results.json)")
    p.add_argument("--point", required=True, help="the constraint point to judge against, e.g. P1")
    p.add_argument("--name", default=None)
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (its evaluation prompts depend on it)")
    p.add_argument("-o", "--output", default=None, help="write the evaluation here (JSON)")
    ns = p.parse_args(argv)
    os.chdir(run.REPO)
    import torch

    from l3m.rewards import RewardModel

    torch.set_num_threads(int(os.environ.get("L3M_THREADS", "1")))
    res = json.loads((Path(ns.results) / "results.json").read_text())
    S = res["settings"]
    pt = next(x for x in res["points"] if x["name"] == ns.point)
    _, task_held = run.task_split(Path(S["task_data"]), 0.1, 0)  # the split run.py makes
    _, harm_held = run.harmful_prompts(0, S.get("rm_heldout_fraction", 0.1))
    tmp = Path(ns.results) / "logs" / "evaluate_one_prompts.jsonl"
    prompts = run.write_prompts(tmp, [e.prompt_text for e in task_held], harm_held, S["eval"]["n_prompts"], ns.seed + 1)
    tmp.unlink()
    heldout = task_held[: S["eval"]["n_ppl"]]
    rms = {a: RewardModel(res["reward_models"][a]["path"], batch_size=S["eval"]["batch_size"]) for a in run.AXES}
    scales = [res["reward_models"][a]["scale"] for a in run.AXES]
    name = ns.name or f"{Path(ns.model_dir).name}@{ns.point}"
    ev = run.evaluate(ns.model_dir, name, rms, pt["b"], scales, heldout, prompts, S["eval"])
    entry = run._entry(ev, name.split("@")[0], pt)
    line = ", ".join(
        f"{a} {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] → {v}"
        for a, r, ci, v in zip(run.AXES, entry["rewards"], entry["rewards_ci95"], entry["verdicts"])
    )
    print(f"{name} at {ns.point} {pt['b']}: {line}; task log-ppl {entry['task_logppl']['mean']:.3f}")
    if ns.output:
        Path(ns.output).write_text(json.dumps(entry, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
