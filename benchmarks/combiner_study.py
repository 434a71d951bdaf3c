"""Which rule combines the detectors: max / Fisher / learned weights, chosen on proxies, reported on attacks.

Fits every detector (guard's five and the anchors Mahalanobis and LID) on the demo's training
split, calibrates on the same calibration half the audit uses, and scores the evaluation half
and the attack sets an audit saved (``OUT/artifacts/attack_*.safetensors``). For each rule of
:class:`guard.detectors.Combined` over guard's own detectors (and, for comparison, with the
anchors in the flag too), prints TPR at 1% FPR per attack row beside the best single detector.

The rule is *chosen* on proxies only (:func:`guard.guarded.proxy_inputs` with a seed the
calibration never saw: noise images, blurred noise, noisy / occluded / sign-noise clean images),
never on the attack rows, which are only reported.

    .venv/bin/python benchmarks/combiner_study.py --demo mnist --audit OUT --json combiner_mnist.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


import guard
from guard.audit.detectors import split_heldout
from guard.core.cache import load_tensors
from guard.detectors import Combined
from guard.evaluation import detection_metrics
from guard.guarded import DEFAULT_DETECTORS, proxy_inputs

ANCHORS = ("mahalanobis", "lid")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="mnist")
    p.add_argument("--audit", required=True, help="an audit's output folder (its attack artifacts are reused)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = guard.demo_model(args.demo, progress=False)
    train, test = guard.demo_data(args.demo)
    g = guard.wrap(model, [*DEFAULT_DETECTORS, *ANCHORS]).fit(train)
    cal_idx, ev_idx = split_heldout(len(test), 0)
    _, cal, _ = g.score(test.x[cal_idx])
    _, ev, _ = g.score(test.x[ev_idx])
    _, prox_fit, _ = g.score(proxy_inputs(test.x[cal_idx], seed=0))
    _, prox_eval, _ = g.score(proxy_inputs(test.x[ev_idx], seed=1))
    attacks = {}
    for f in sorted((Path(args.audit) / "artifacts").glob("attack_*.safetensors")):
        t, _ = load_tensors(f)
        _, s, _ = g.score(t["x_adv"].float())
        attacks[f.stem[len("attack_"):]] = {k: v[t["success"].bool()] for k, v in s.items()}
    own = [n for n in DEFAULT_DETECTORS if n in g.detectors]
    combos = {f"{rule}({'own' if names is own else 'own+anchors'})": (rule, names)
              for names in (own, [*own, *[a for a in ANCHORS if a in g.detectors]]) for rule in ("max", "fisher", "weighted")}
    rows: dict[str, dict[str, float | None]] = {}
    flag_rate: dict[str, float] = {}
    for label, (rule, names) in combos.items():
        comb = Combined(names, rule=rule)
        comb.calibrate_scores({n: cal[n] for n in names}, 0.01, proxy_scores={n: prox_fit[n] for n in names})
        ev_c = comb.combine(ev)
        flag_rate[label] = float(comb.predict_scores(ev_c).float().mean())
        rows.setdefault("proxies (choice)", {})[label] = detection_metrics(comb.combine(prox_eval), ev_c)["tpr_at_1fpr"]
        for atk, s in attacks.items():
            rows.setdefault(atk, {})[label] = detection_metrics(comb.combine(s), ev_c)["tpr_at_1fpr"] if s[names[0]].numel() else None
    for atk, s in {"proxies (choice)": prox_eval, **attacks}.items():
        singles = {n: detection_metrics(s[n], ev[n])["tpr_at_1fpr"] if s[n].numel() else None for n in g.detectors}
        rows[atk]["best single (own)"] = max((v for n, v in singles.items() if n in own and v is not None), default=None)
        rows[atk]["best anchor"] = max((v for n, v in singles.items() if n in ANCHORS and v is not None), default=None)
        rows[atk]["singles"] = singles  # type: ignore[assignment]
    chosen = max((c for c in combos if c.endswith("(own)")), key=lambda c: rows["proxies (choice)"][c] or 0.0)
    cols = [*combos, "best single (own)", "best anchor"]
    print(f"TPR at 1% FPR ({args.demo}); rule chosen on the proxies: {chosen}")
    print(f"{'row':<20}" + "".join(f"{c[:18]:>19}" for c in cols))
    for atk, r in rows.items():
        print(f"{atk:<20}" + "".join(f"{'-' if r.get(c) is None else format(r[c], '.3f'):>19}" for c in cols))
    print(f"{'clean flag rate':<20}" + "".join(f"{flag_rate.get(c, float('nan')):>19.3f}" for c in cols[:len(combos)]))
    out = {"demo": args.demo, "chosen_on_proxies": chosen, "tpr_at_1fpr": rows, "clean_flag_rate_at_1fpr": flag_rate,
           "detectors": g.describe()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
