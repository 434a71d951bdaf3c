"""Ship a model tools/train_cifar10_robust.py wrote as a CIFAR-10 demo variant (guard/_data/cifar10).

Copies ``DIR/resnet20-METHOD.safetensors`` byte for byte to ``guard/_data/cifar10/resnet20-VARIANT.safetensors``
and writes its record (the training record, plus where it was copied from, why this model, and the
results file that measured it); ``guard.demo_model("cifar10", variant=VARIANT)`` checks the SHA-256:

    .venv/bin/python tools/ship_cifar10_variant.py --from benchmarks/results/cifar10-robust-pgd-3ep --method pgd \\
        --variant robust --evaluated-in benchmarks/results/robust_eval_cifar10_pgd3ep.json --why "..."
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True, help="the training run's folder")
    p.add_argument("--method", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--evaluated-in", required=True, help="the results file with the evaluation that chose this model")
    p.add_argument("--why", required=True)
    args = p.parse_args(argv)
    src = Path(args.src)
    weights, record_path = src / f"resnet20-{args.method}.safetensors", src / f"resnet20-{args.method}.json"
    record = json.loads(record_path.read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != record["sha256"]:
        raise SystemExit(f"{weights} has SHA-256 {digest}, its record says {record['sha256']}")
    if not (ROOT / args.evaluated_in).is_file():
        raise SystemExit(f"--evaluated-in {args.evaluated_in}: no such results file")
    dest = ROOT / "guard" / "_data" / "cifar10" / f"resnet20-{args.variant}.safetensors"
    shutil.copyfile(weights, dest)
    out = {
        "file": dest.name,
        "copied_from": f"{weights.as_posix()} (byte for byte; same SHA-256)",
        "why_this_one": args.why,
        "evaluated_in": args.evaluated_in,
        **{k: v for k, v in record.items() if k != "file"},
    }
    (dest.with_suffix(".json")).write_text(json.dumps(out, indent=2) + "\n")
    print(f"shipped {dest} ({digest[:16]}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
