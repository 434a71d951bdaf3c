"""Generate the results tables of README.md and BENCHMARKS.md from the committed results files.

A table lives in a document between two markers::

    <!-- results:NAME -->
    ...generated rows...
    <!-- /results:NAME -->

``NAME`` is a key of :data:`TABLES`, which says which file under ``benchmarks/results`` the table is
read from and how it is drawn. ``--write`` rewrites every block from its file; ``--check`` (what the
test suite runs) exits 1 and prints the first difference when a block does not equal what its file
gives, so a figure typed by hand, or a results file updated without its tables, fails CI. Every
table ends with the command that wrote its file, the commit and the machine.

    .venv/bin/python tools/results_tables.py --write
    .venv/bin/python tools/results_tables.py --check
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ("README.md", "BENCHMARKS.md")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _ci(iv: Any) -> str:
    return "" if not iv else f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def _source(r: dict[str, Any]) -> str:
    prov = r.get("provenance", {})
    m = prov.get("machine", {})
    return (
        f"\n_From `benchmarks/results/{r['_file']}`: `{r.get('command', prov.get('command'))}` at commit "
        f"`{str(r.get('commit', prov.get('commit')))[:12]}` on {m.get('cores', '?')} cores "
        f"({m.get('torch_threads', '?')} torch threads), {prov.get('finished', '?')}._\n"
    )


def _robust_row(label: str, f: dict[str, Any]) -> str:
    iv = f.get("intervals", {})
    return (
        f"| {label} | {f['method']} | {f['n']} | {_pct(f['clean_accuracy'])}{_ci(iv.get('clean_accuracy'))} | "
        f"{_pct(f['clean_rejected'])} | {_pct(f['robust_accuracy'])}{_ci(iv.get('robust_accuracy'))} | "
        f"{_pct(f['robust_accuracy_with_rejection'])}{_ci(iv.get('robust_accuracy_with_rejection'))} |"
    )


def robust_hardening(r: dict[str, Any]) -> str:
    rows = [
        "| data, eps | method | n | clean accuracy [95% CI] | clean rejected | robust accuracy [95% CI] | "
        "robust accuracy with rejection [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, eps in (("mnist", "0.3"), ("cifar10", "8/255")):
        f = r.get(part)
        if not f:
            continue
        name = "MNIST" if part == "mnist" else "CIFAR-10"
        rows.append(_robust_row(f"{name}, {eps}", f))
        if f.get("plain_at"):
            rows.append(_robust_row(f"{name}, {eps}", f["plain_at"]))
    attacks = sorted({a for part in ("mnist", "cifar10") if r.get(part) for a in r[part]["attacks"]})
    lines = "\n".join(rows) + f"\n\nAttacks (worst case per image): {', '.join(attacks)}.\n"
    for part in ("mnist", "cifar10"):
        if r.get(part):
            lines += _source(
                {
                    **r[part],
                    "_file": r["_file"],
                    "provenance": r[part].get("provenance", {}),
                    "command": r[part].get("provenance", {}).get("command"),
                    "commit": r[part].get("provenance", {}).get("commit"),
                }
            )
    return lines


def online_cost(r: dict[str, Any]) -> str:
    rows = ["| method | guard.harden (s) | plain PyTorch loop (s) | ratio |", "|---|---|---|---|"]
    for m, v in r["methods"].items():
        rows.append(f"| {m} | {v['guard_seconds']:.2f} | {v['plain_seconds']:.2f} | {v['ratio']:.3f} |")
    return (
        "\n".join(rows)
        + f"\n\nOne epoch, {r['images']} MNIST images, {r['attack_steps']} attack steps, median of {r['repeats']}.\n"
        + _source(r)
    )


def mutants(r: dict[str, Any]) -> str:
    rows = ["| mutant | caught by |", "|---|---|"]
    for m in r["mutants"]:
        caught = m.get("caught_by") or m.get("failed") or []
        rows.append(f"| {m['description']} | {', '.join(f'`{t}`' for t in caught[:3]) if caught else '**SURVIVED**'} |")
    return "\n".join(rows) + "\n" + _source(r)


def certified_patches(r: dict[str, Any]) -> str:
    rows = [
        "| model, patch | n | clean accuracy | certified recovery | certified detection | clean flagged |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, f: dict[str, Any]) -> str:
        return (
            f"| {label} | {f['n']} | {_pct(f['clean_accuracy'])} | {_pct(f['certified_recovery'])} | "
            f"{_pct(f['certified_detection'])} | {_pct(f['clean_flagged'])} |"
        )

    c = r.get("cifar10")
    if c:
        rows.append(row(f"CIFAR-10, {c['patch_side']}x{c['patch_side']} ({_pct(c['patch_area'])})", c))
    for area, f in (r.get("imagenet") or {}).items():
        rows.append(row(f"ImageNet sample, {area} area", f))
    return "\n".join(rows) + "\n" + _source(r)


def _rate(v: dict[str, Any] | None) -> str:
    return "n/a" if not v else f"{100 * v['rate']:.1f}% ({v['k']}/{v['n']}){_ci(v.get('ci95'))}"


def detection_by_strength(r: dict[str, Any]) -> str:
    """The detection table by attack strength: the combined flag and the best single detector at the
    calibrated threshold (TPR over successful adversarials, with k/n and the 95% interval), then AUROC."""
    rows = [
        "| attack | strength | held out | success | combined flag: TPR at the operating point [95% CI] | combined AUROC | "
        "best single detector at the operating point |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d = row["detectors"]
        comb = d.get("combined", {})
        singles = {k: v for k, v in d.items() if k != "combined" and v.get("tpr")}
        best = max(singles, key=lambda k: singles[k]["tpr"]["rate"]) if singles else None
        auroc = comb.get("auroc")
        rows.append(
            f"| {row['attack']} | {row['strength']} | {'yes' if row['held_out'] else ''} | "
            f"{_pct(row['success_rate'])} | {_rate(comb.get('tpr'))} | {'n/a' if auroc is None else f'{auroc:.3f}'} | "
            f"{best + ': ' + _rate(singles[best]['tpr']) if best else 'n/a'} |"
        )
    c = r["clean_fpr"].get("combined")
    return (
        "\n".join(rows) + f"\n\nRealised clean flag rate of the combined flag (target {_pct(r['target_fpr'], 0)}, "
        f"calibrated on {r['n_calibration']} other clean images): {_rate(c)}.\n" + _source(r)
    )


def adaptive(r: dict[str, Any]) -> str:
    a = r["adaptive"]
    rows = [
        "| eps | n | adaptive: misclassified | adaptive: evasion [95% CI] | oblivious PGD: evasion [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for e in a["per_eps"]:
        rows.append(
            f"| {e['eps']:g} | {e['n']} | {_pct(e['misclassified'])} | {_pct(e['evasion'])}{_ci(e['evasion_ci95'])} | "
            f"{_pct(e['oblivious_evasion'])}{_ci(e['oblivious_evasion_ci95'])} |"
        )
    return (
        "\n".join(rows) + f"\n\nMembers: {', '.join(a['members'])}; detector weights swept "
        f"{a['weights']}; {a['steps']} steps, {a['restarts']} restart(s); evasion = misclassified and not flagged at the "
        f"{_pct(a['fpr'], 0)}-FPR threshold.\n" + _source(r)
    )


#: table name -> (results file, renderer)
TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "robust_hardening": ("robust_hardening.json", robust_hardening),
    "online_cost": ("bench_online_harden.json", online_cost),
    "mutants": ("mutants.json", mutants),
    "certified_patches": ("certified_patches.json", certified_patches),
    "detection_mnist_quick": ("detection_by_strength_mnist_quick.json", detection_by_strength),
    "adaptive_mnist": ("adaptive_mnist_n32.json", adaptive),
}


def render(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"unknown results table {name!r}; known: {sorted(TABLES)}")
    file, fn = TABLES[name]
    data = json.loads((RESULTS / file).read_text())
    return fn({**data, "_file": file})


def process(doc: Path, write: bool) -> list[str]:
    """Re-render every block of ``doc``; returns the names of the blocks that differed."""
    text = doc.read_text()
    stale: list[str] = []

    def sub(m: re.Match[str]) -> str:
        new = render(m["name"])
        if new != m["body"]:
            stale.append(m["name"])
            if not write:
                diff = difflib.unified_diff(
                    m["body"].splitlines(), new.splitlines(), "in " + doc.name, "from results", lineterm=""
                )
                print("\n".join(list(diff)[:20]), file=sys.stderr)
        return m.group(1) + new + m.group(4)

    out = BLOCK.sub(sub, text)
    if write and out != text:
        doc.write_text(out)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    p.add_argument(
        "--docs", nargs="+", default=None, help="documents to process (default: README.md and BENCHMARKS.md)"
    )
    args = p.parse_args(argv)
    docs = [Path(d) for d in args.docs] if args.docs else [ROOT / d for d in DOCS]
    stale = {d.name: process(d, args.write) for d in docs}
    bad = {d: s for d, s in stale.items() if s}
    if args.check and bad:
        print(f"tables differ from their results files: {bad}; run tools/results_tables.py --write", file=sys.stderr)
        return 1
    print(
        "rewrote " + ", ".join(f"{d}: {s}" for d, s in bad.items()) if bad else "all tables match their results files"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
