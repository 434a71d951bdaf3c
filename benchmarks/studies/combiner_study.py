"""Which rule combines the detectors: max / Fisher / learned weights, chosen on proxies, reported on attacks.

Fits every detector (guard's five and the anchors Mahalanobis and LID) on the demo's training
split, calibrates on the same calibration half the audit uses, and scores the evaluation half
and the attack sets an audit saved (``OUT/artifacts/attack_*.safetensors``). For each rule of
:class:`guard.detectors.Combined` over guard's own detectors (and, for comparison, with the
anchors in the flag too), prints TPR at 1% FPR per attack row beside the best single detector.

The rule is *chosen* on proxies only (:func:`guard.guarded.proxy_inputs` with a seed the
calibration never saw: noise images, blurred noise, noisy / occluded / sign-noise clean images),
never on the attack rows, which are only reported. Beside them, "weighted LOFO": weights learned
by logistic regression on clean scores vs the successful attacks of every *other* attack family
(gradient: FGSM, PGD, DeepFool, CW; patches; feature adversaries; fooling images), reported on the
left-out family only — what a combiner trained on known attacks does on an unseen kind.

Writes benchmarks/results/combiner_study.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.combiner_study --demo mnist --audit OUT [--out benchmarks/results/combiner_study.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.audit.detectors import split_heldout
from guard.core.cache import load_tensors
from guard.core.provenance import write_results
from guard.detectors import Combined
from guard.evaluation import detection_metrics
from guard.guarded import DEFAULT_DETECTORS, proxy_inputs

ANCHORS = ("mahalanobis", "lid")
#: attack families for the leave-one-family-out combiner
FAMILY = {
    "fgsm": "gradient",
    "pgd": "gradient",
    "deepfool": "gradient",
    "cw": "gradient",
    "patch_gan": "patch",
    "universal_patch": "patch",
    "random_patch": "patch",
    "feature_adversary": "feature",
    "fooling_gradient": "fooling",
    "fooling_direct": "fooling",
    "fooling_cppn": "fooling",
}


def _torchattacks_rows(model, x, y, names, n):
    """DeepFool (Moosavi-Dezfooli et al. 2016) and Carlini-Wagner L2 (2017) from torchattacks: the
    attack rows of Lee et al.'s Mahalanobis table that guard does not ship as attacks."""
    import time

    import torch
    import torchattacks

    model = model.eval()
    with torch.no_grad():
        keep = (model(x).argmax(1) == y).nonzero().squeeze(1)[:n]
    xs, ys = x[keep], y[keep]
    makers = {
        "deepfool": lambda: torchattacks.DeepFool(model, steps=50, overshoot=0.02),
        "cw": lambda: torchattacks.CW(model, c=1.0, kappa=0.0, steps=100, lr=0.01),
    }
    out = {}
    for name in names:
        if name not in makers:
            raise ValueError(f"--torchattacks names {sorted(makers)}; got {name!r}.")
        t0 = time.perf_counter()
        adv = torch.cat([makers[name]()(xs[i : i + 50], ys[i : i + 50]) for i in range(0, len(xs), 50)]).detach()
        with torch.no_grad():
            ok = model(adv).argmax(1) != ys
        out[name] = {"x_adv": adv, "success": ok, "seconds": time.perf_counter() - t0}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="mnist")
    p.add_argument("--audit", required=True, help="an audit's output folder (its attack artifacts are reused)")
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "combiner_study")
    p.add_argument(
        "--torchattacks",
        default="deepfool,cw",
        help="extra attack rows made with torchattacks on the evaluation half (comma list of deepfool, cw; '' for none)",
    )
    p.add_argument("--n-extra", type=int, default=200, help="images attacked for each torchattacks row")
    args = p.parse_args()
    pin_threads(args.threads)
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
        attacks[f.stem[len("attack_") :]] = {k: v[t["success"].bool()] for k, v in s.items()}
    extra = [a for a in args.torchattacks.split(",") if a]
    if extra:
        for name, res in _torchattacks_rows(model, test.x[ev_idx], test.y[ev_idx], extra, args.n_extra).items():
            _, s, _ = g.score(res["x_adv"])
            attacks[name] = {k: v[res["success"]] for k, v in s.items()}
            print(
                f"{name}: success {float(res['success'].float().mean()):.3f} on {res['success'].numel()} correctly "
                f"classified evaluation images, {res['seconds']:.0f} s"
            )
    own = [n for n in DEFAULT_DETECTORS if n in g.detectors]
    combos = {
        f"{rule}({'own' if names is own else 'own+anchors'})": (rule, names)
        for names in (own, [*own, *[a for a in ANCHORS if a in g.detectors]])
        for rule in ("max", "fisher", "weighted")
    }
    rows: dict[str, dict[str, float | None]] = {}
    flag_rate: dict[str, float] = {}
    for label, (rule, names) in combos.items():
        comb = Combined(names, rule=rule)
        comb.calibrate_scores({n: cal[n] for n in names}, 0.01, proxy_scores={n: prox_fit[n] for n in names})
        ev_c = comb.combine(ev)
        flag_rate[label] = float(comb.predict_scores(ev_c).float().mean())
        rows.setdefault("proxies (choice)", {})[label] = detection_metrics(comb.combine(prox_eval), ev_c)["tpr_at_1fpr"]
        for atk, s in attacks.items():
            rows.setdefault(atk, {})[label] = (
                detection_metrics(comb.combine(s), ev_c)["tpr_at_1fpr"] if s[names[0]].numel() else None
            )
    # Leave one attack family out: weights learned on clean vs the *other* families' attacks (a
    # supervised combiner, like Lee et al.'s logistic regression, that never saw this row's family)
    lofo = "weighted LOFO (all)"
    names_all = [*own, *[a for a in ANCHORS if a in g.detectors]]
    for atk in attacks:
        fam = FAMILY.get(atk)
        train_rows = [a for a in attacks if FAMILY.get(a) not in (fam, None) and attacks[a][names_all[0]].numel()]
        if fam is None or not train_rows or not attacks[atk][names_all[0]].numel():
            rows[atk][lofo] = None
            continue
        comb = Combined(names_all, rule="weighted")
        pos = {n: torch.cat([attacks[a][n] for a in train_rows]) for n in names_all}
        comb.calibrate_scores(
            {n: cal[n] for n in names_all}, 0.01, proxy_scores=pos
        )  # the other families as the "proxies"
        rows[atk][lofo] = detection_metrics(comb.combine(attacks[atk]), comb.combine(ev))["tpr_at_1fpr"]
    combos_cols = [*combos, lofo]
    for atk, s in {"proxies (choice)": prox_eval, **attacks}.items():
        singles = {n: detection_metrics(s[n], ev[n])["tpr_at_1fpr"] if s[n].numel() else None for n in g.detectors}
        rows[atk]["best single (own)"] = max(
            (v for n, v in singles.items() if n in own and v is not None), default=None
        )
        rows[atk]["best anchor"] = max((v for n, v in singles.items() if n in ANCHORS and v is not None), default=None)
        rows[atk]["singles"] = singles  # type: ignore[assignment]
    chosen = max(combos, key=lambda c: rows["proxies (choice)"][c] or 0.0)
    cols = [*combos_cols, "best single (own)", "best anchor"]
    print(f"TPR at 1% FPR ({args.demo}); rule chosen on the proxies: {chosen}")
    print(f"{'row':<20}" + "".join(f"{c[:18]:>19}" for c in cols))
    for atk, r in rows.items():
        print(f"{atk:<20}" + "".join(f"{'-' if r.get(c) is None else format(r[c], '.3f'):>19}" for c in cols))
    print(f"{'clean flag rate':<20}" + "".join(f"{flag_rate.get(c, float('nan')):>19.3f}" for c in cols[: len(combos)]))
    out = {
        "demo": args.demo,
        "audit": args.audit,
        "torchattacks_rows": extra,
        "n_extra": args.n_extra,
        "threads": args.threads,
        "chosen_on_proxies": chosen,
        "tpr_at_1fpr": rows,
        "clean_flag_rate_at_1fpr": flag_rate,
        "detectors": g.describe(),
    }
    write_results(args.out, json.loads(json.dumps(out, default=str)))  # parameters that are not JSON types as their str
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
