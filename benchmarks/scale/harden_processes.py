"""Benchmark of guard.harden: seconds per round split into attack generation and training, 1 vs 2 processes.

Runs ``torchrun --standalone --nproc_per_node=N -m guard harden`` for N = 1 and 2 on
the demo model (or, with ``--tiny``, a narrow DemoNet trained here) and prints, per round,
the attack-generation and training seconds and the ratios 2-process / 1-process. Every
process uses one thread (``OMP_NUM_THREADS=1``), so 2 processes use 2 cores. Writes
benchmarks/results/harden_processes.json:

    .venv/bin/python -m benchmarks.scale.harden_processes                 # demo model, 3 rounds
    .venv/bin/python -m benchmarks.scale.harden_processes --tiny --rounds 2 --budget quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.fixtures.timing import out_option
from guard.core.provenance import write_results

TINY_MODULE = """
from guard.core.cache import load_tensors
from guard.core.models import DemoNet


def build():
    model = DemoNet(width=8, hidden=32)
    model.load_state_dict(load_tensors("tiny.safetensors")[0])
    return model
"""


def run(n: int, args: argparse.Namespace, tmp: Path, tiny: bool) -> tuple[dict, float]:
    out = tmp / f"n{n}"
    src = ["--model", "tiny_module:build", "--data", "mnist"] if tiny else ["--demo"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={n}",
        "-m",
        "guard",
        "harden",
        *src,
        "--rounds",
        str(args.rounds),
        "--epochs-per-round",
        str(args.epochs),
        "--budget",
        args.budget,
        "--train-size",
        str(args.train),
        "--out",
        str(out),
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::RuntimeWarning"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=tmp)
    section = json.loads((out / "harden.json").read_text())["harden"]
    return {"history": section["rounds"], "timings": section["timings"]}, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="a narrow DemoNet instead of the demo model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--budget", choices=["quick", "default"], default="default")
    out_option(p, "harden_processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.tiny:
            import torch

            import guard
            from guard.core.cache import save_tensors
            from guard.core.models import DemoNet
            from guard.training.classifier import train_classifier

            torch.set_num_threads(1)
            train, _ = guard.demo_data()
            torch.manual_seed(0)
            m = DemoNet(width=8, hidden=32)
            train_classifier(m, train.x[:2000], train.y[:2000], epochs=2, lr=3e-3, seed=0, progress=False)
            save_tensors(tmp / "tiny.safetensors", m.state_dict())
            (tmp / "tiny_module.py").write_text(TINY_MODULE)
        results = {n: run(n, args, tmp, args.tiny) for n in (1, 2)}
    print(
        f"guard.harden, {'tiny DemoNet' if args.tiny else 'demo model'}, {args.rounds} rounds x {args.epochs} epochs, "
        f"budget {args.budget}, {args.train} clean training images; 1 thread per process"
    )
    print(
        f"{'round':>5} | {'attack 1p':>9} {'attack 2p':>9} {'ratio':>6} | {'train 1p':>9} {'train 2p':>9} {'ratio':>6} | {'acc 1p':>7} {'acc 2p':>7}"
    )
    h1, h2 = results[1][0]["history"], results[2][0]["history"]
    for a, b in zip(h1, h2):
        print(
            f"{a['round']:>5} | {a['seconds_attack']:9.2f} {b['seconds_attack']:9.2f} {b['seconds_attack'] / a['seconds_attack']:6.2f} | "
            f"{a['seconds_train']:9.2f} {b['seconds_train']:9.2f} {b['seconds_train'] / a['seconds_train']:6.2f} | "
            f"{a['clean_accuracy']:7.4f} {b['clean_accuracy']:7.4f}"
        )
    t1, t2 = results[1][0]["timings"], results[2][0]["timings"]
    print(
        f"total attack s: 1p {t1['attack_seconds']:.1f}  2p {t2['attack_seconds']:.1f}; total train s: 1p {t1['train_seconds']:.1f}  "
        f"2p {t2['train_seconds']:.1f} (ratio {t2['train_seconds'] / t1['train_seconds']:.2f}); wall incl. start-up: "
        f"1p {results[1][1]:.1f} s, 2p {results[2][1]:.1f} s"
    )
    print(
        "final fresh-attack classes fooled >= 99%:",
        h1[-1].get("fooling_classes_ge99_count"),
        "(1p)",
        h2[-1].get("fooling_classes_ge99_count"),
        "(2p)",
    )
    write_results(
        args.out,
        {
            "model": "tiny DemoNet (width 8, hidden 32)" if args.tiny else "guard.demo_model('mnist')",
            "rounds": args.rounds,
            "epochs_per_round": args.epochs,
            "train_images": args.train,
            "budget": args.budget,
            "threads_per_process": 1,
            "processes": {
                str(n): {
                    "wall_seconds_with_start_up": round(wall, 1),
                    "timings": res["timings"],
                    "rounds": res["history"],
                }
                for n, (res, wall) in results.items()
            },
            "ratio_train_seconds_2p_over_1p": t2["train_seconds"] / t1["train_seconds"],
            "ratio_attack_seconds_2p_over_1p": t2["attack_seconds"] / t1["attack_seconds"],
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
