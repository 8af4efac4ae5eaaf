"""Fine-tune the harmless reward model on HH-RLHF *and* PKU-SafeRLHF pairs, keeping HH's held-out pairs as they are.

The experiment's harmless model (`rm_harmless_ft`) is fine-tuned on the 1,528 HH-RLHF training pairs alone and scores
0.647 on HH's 382 held-out pairs. This script writes the same HH split, plus N pairs drawn (seeded) from the
*training* side of PKU-SafeRLHF's split by prompt (fraction 0.2, seed 0: the split `run.py` uses for its harmful
prompts, so its held-out harmful requests stay unseen), as plain preference files, and a config that fine-tunes
from the same head-only start with the same settings:

    .venv/bin/python experiments/helpful_harmless/rm_choices/pku_finetune.py [--pku-pairs 1000] [--out runs/rm_pku]
    .venv/bin/l3m train-reward runs/rm_pku/rm_harmless_ft_pku.yaml
    .venv/bin/l3m evaluate-reward runs/rm_pku/rm_harmless_ft_pku runs/rm_pku/pku_heldout.jsonl   # PKU, unseen prompts
"""

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run  # noqa: E402  (experiments/helpful_harmless/run.py: the CPU preset's settings)

from l3m.preference_data import load_preference_sources, split_pairs
from l3m.reward_training import prepare_pairs

SHARED = Path("../shared/data/preference/harmless")
HH, PKU = SHARED / "hh_rlhf_harmless_base_dev.jsonl.gz", SHARED / "pku_saferlhf_realign_5k.json"


def write(path: Path, pairs) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pku-pairs", type=int, default=1000, help="PKU training pairs to add (seeded sample)")
    ap.add_argument("--pku-heldout", type=int, default=200, help="PKU held-out pairs to write for scoring")
    ap.add_argument("--out", default="runs/rm_pku")
    ap.add_argument("--start", default="runs/helpful_harmless/rm_harmless", help="the head-only model to start from")
    ns = ap.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    hh_train, hh_held, _ = prepare_pairs({"train": [str(HH)], "heldout_fraction": 0.2}, seed=0)  # as rm_harmless_ft
    pku_train, pku_held = split_pairs(load_preference_sources([str(PKU)]).pairs, 0.2, seed=0)
    rng = random.Random(0)
    pku_add = rng.sample(pku_train, min(ns.pku_pairs, len(pku_train)))
    pku_eval = rng.sample(pku_held, min(ns.pku_heldout, len(pku_held)))
    files = {
        "hh_train": write(out / "hh_train.jsonl", hh_train),
        "hh_heldout": write(out / "hh_heldout.jsonl", hh_held),
        "pku_train": write(out / "pku_train.jsonl", pku_add),
        "pku_heldout": write(out / "pku_heldout.jsonl", pku_eval),
    }
    cfg = {
        "model": ns.start,
        "data": {"train": [files["hh_train"], files["pku_train"]], "eval": files["hh_heldout"]},
        "training": {
            **run.CPU["rm_finetune"]["harmless"],  # the experiment's fine-tuning settings (run 2), unchanged
            "output_dir": str(out / "rm_harmless_ft_pku"),
            "seed": 0,
        },
    }
    (out / "rm_harmless_ft_pku.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"HH {len(hh_train)} train / {len(hh_held)} held out; PKU +{len(pku_add)} train, {len(pku_eval)} held out")
    print(f"config: {out / 'rm_harmless_ft_pku.yaml'}")


if __name__ == "__main__":
    main()
