"""Hardening with guard.attacks as the round schedule vs a model hardened by an earlier implementation.

Until commit e39b47e, ``harden`` generated its round attacks with small generators of its own
(``training/round_attacks.py``, "builtin"); now the rounds run configured instances of
``guard.attacks``. This script hardens the demo model with the current code (timing every
round), then measures it and a model hardened by the earlier code (``--baseline``, the
``hardened_model.safetensors`` that ``guard harden --demo --rounds 3`` wrote at e39b47e) with
the *same* fresh attacks, so that neither implementation is judged by its own attacks:

* the round schedule at the default budget, seed 12345 (never used in training);
* the audit's stronger fooling attacks (FoolingGradient 300 steps, MAP-Elites direct 400 and
  CPPN 100 generations, threshold 0.99).

Writes benchmarks/results/harden_schedule.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.harden_schedule --baseline OLD/hardened_model.safetensors
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks import FoolingEvolution, FoolingGradient
from guard.core.cache import load_tensors
from guard.core.provenance import write_results
from guard.demo import shift_augment
from guard.training import AttackBudget, HardenConfig, RejectClassifier, grow_head, harden
from guard.training.round_attacks import FOOLING_ATTACKS, ROUND_ATTACKS, generate_round_attacks, score_attack_set


def strong_fooling(model: torch.nn.Module, n: int) -> dict:
    """Classes with a >= 99% fooling image from the audit-strength attacks, per kind."""
    out = {}
    attacks = {
        "fooling_gradient": FoolingGradient(steps=300, lr=0.1, threshold=0.99, samples_per_class=4, seed=777),
        "fooling_direct": FoolingEvolution(
            encoding="direct",
            population=100,
            generations=400,
            threshold=0.99,
            stop_when_done=False,
            extra_samples=0,
            seed=778,
        ),
        "fooling_cppn": FoolingEvolution(
            encoding="cppn",
            population=100,
            generations=100,
            threshold=0.99,
            stop_when_done=False,
            extra_samples=0,
            seed=779,
        ),
    }
    for name, atk in attacks.items():
        res = atk(model, shape=(1, 28, 28), classes=range(n))
        with torch.no_grad():
            p = model(res.x_adv).softmax(1)[:, :n]
        best = p.max(0).values
        out[name] = {"classes_ge99": int((best >= 0.99).sum()), "median_conf": float(best.median())}
    return out


def measure(model: RejectClassifier, test: guard.Split, train: guard.Split, n: int) -> dict:
    s = generate_round_attacks(
        model,
        ROUND_ATTACKS,
        num_classes=n,
        image_shape=(1, 28, 28),
        pool=(train.x, train.y),
        budget=AttackBudget(),
        seed=12345,
    )
    sc = score_attack_set(model, s, n)
    acc = float((model.predict(test.x) == test.y).float().mean())
    return {
        "clean_accuracy": acc,
        "schedule_classes_ge99": sc["fooling_classes_ge99_count"],
        "schedule_median_conf": sc["fooling_median_confidence"],
        "patch_fooling_rate": sc["patch_fooling_rate"],
        **{f"schedule_{k}": sc.get(f"fooling_classes_ge99_count_{k}") for k in FOOLING_ATTACKS},
        "strong": strong_fooling(model, n),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", required=True, help="hardened_model.safetensors from guard harden at e39b47e")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "harden_schedule")
    args = p.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(0)
    model = guard.demo_model(progress=False)
    train, test = guard.demo_data()
    t0 = time.perf_counter()
    res = harden(
        model, train, test=test, config=HardenConfig(rounds=args.rounds), augment=shift_augment, progress=False
    )
    wall = time.perf_counter() - t0
    rounds = [
        {"round": h["round"], "attack_s": h["seconds_attack"], "train_s": h["seconds_train"]} for h in res.history
    ]
    net, head = grow_head(model)
    net.load_state_dict(load_tensors(args.baseline)[0])
    old = RejectClassifier(net, 10, head).eval()
    out = {
        "rounds": args.rounds,
        "baseline": args.baseline,
        "threads": args.threads,
        "current": {"wall_seconds": round(wall, 1), "rounds": rounds, **measure(res.model, test, train, 10)},
        "baseline_e39b47e": measure(old, test, train, 10),
    }
    print(json.dumps(out, indent=2))
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
