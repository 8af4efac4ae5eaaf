"""Where the wall clock of the helpful-harmless runs goes: sampling against everything else, per method.

Why: the efficiency target compares L3M with MM + its SFT stage. Both methods sample the same number of
responses per step with the same generator, so the comparison turns on (a) how long the sampled responses
are, (b) the SFT stage only MM needs, (c) the reference model's forward pass only MM makes and the task
loss's forward/backward only the L3M makes. This script splits each run's recorded wall clock into those
parts from the per-step metrics (``time/generation_s``, ``sample/mean_length``) the trainer logged.

    .venv/bin/python experiments/helpful_harmless/efficiency.py [RESULTS_DIR]

It reads ``RESULTS_DIR/results.json`` and the copies of each run's metrics in ``RESULTS_DIR/runs/``.

Prints a Markdown table and writes ``efficiency.json`` beside ``results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_parts(run_dir: Path, wall_s: float) -> dict:
    """Sampling seconds, sampled tokens and the rest of one training run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "time/generation_s" in r]
    gen_s = sum(r["time/generation_s"] for r in steps)
    n_per_step = None
    cfg = run_dir / "summary.json"
    if cfg.is_file():
        n_per_step = json.loads(cfg.read_text()).get("samples_per_step")
    mean_len = sum(r["sample/mean_length"] for r in steps) / max(len(steps), 1)
    return {
        "steps": len(steps),
        "wall_s": wall_s,
        "generation_s": gen_s,
        "rest_s": wall_s - gen_s,
        "mean_sample_tokens": mean_len,
        "samples_per_step": n_per_step,
    }


def main(argv: list[str]) -> None:
    results_dir = Path(argv[0]) if argv else HERE / "results"
    runs_dir = results_dir / "runs"
    res = json.loads((results_dir / "results.json").read_text())
    eff = res["efficiency"]
    out = {"sft_wall_s": eff["sft_wall_s"], "points": {}}
    lines = [
        "| point | method | wall (s) | sampling (s) | rest (s) | + SFT stage (s) | mean sample (tokens) |"
        " sampling s per step | rest s per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pt in res["points"]:
        name = pt["name"]
        e = eff[name]
        parts = {
            "l3m": run_parts(runs_dir / f"l3m_{name}", e["l3m_wall_s"]),
            "mm": run_parts(runs_dir / f"mm_{name}", e["mm_wall_s"]),
        }
        for method, p in parts.items():
            sft = f"{eff['sft_wall_s']:.0f}" if method == "mm" else "—"
            cells = [name, method.upper(), f"{p['wall_s']:.0f}", f"{p['generation_s']:.0f}", f"{p['rest_s']:.0f}", sft]
            cells += [f"{p['mean_sample_tokens']:.1f}", f"{p['generation_s'] / p['steps']:.1f}"]
            cells += [f"{p['rest_s'] / p['steps']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        l3m, mm = parts["l3m"], parts["mm"]
        # L3M with MM's sampling time: what the ratio would be had both sampled responses of MM's length
        same_sampling = (l3m["rest_s"] + mm["generation_s"]) / (mm["wall_s"] + eff["sft_wall_s"])
        out["points"][name] = {**parts, "ratio": e["wall_ratio_l3m_to_mm"], "ratio_with_mm_sampling": same_sampling}
    print("\n".join(lines))
    print()
    for name, p in out["points"].items():
        print(
            f"{name}: L3M / (MM + SFT) = {p['ratio']:.2f} as run; {p['ratio_with_mm_sampling']:.2f} with MM's "
            "sampling seconds in place of the L3M's"
        )
    out["table_md"] = "\n".join(lines)
    (results_dir / "efficiency.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
