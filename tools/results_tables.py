"""Generate the results tables of BENCHMARKS.md (and README.md, which holds none now) from the committed results files.

A table lives in a document between two markers::

    <!-- results:NAME -->
    ...generated rows...
    <!-- /results:NAME -->

``NAME`` is a key of :data:`TABLES`, which says which file under ``benchmarks/results`` the table is
read from and how it is drawn. ``--write`` rewrites every block from its file; ``--check`` (what the
test suite runs) exits 1 and prints the first difference when a block does not equal what its file
gives, so a figure typed by hand, or a results file updated without its tables, fails CI; it also
fails when a table of :data:`TABLES` is in none of the documents. Every table ends with the
command that wrote its file, the commit and the machine. ``--list`` prints the table names.

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
#: the documents whose tables are generated (the limits guide holds the robust variant's detection table, the
#: patches guide the study that chose the masking score)
DOCS = (
    "README.md",
    "BENCHMARKS.md",
    "docs/guides/limits.md",
    "docs/guides/patches.md",
    "docs/guides/harden.md",
    "docs/reference/test-quality.md",
    "docs/reference/cost.md",
)
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _pct(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _ci(iv: Any) -> str:
    return "" if not iv else f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


#: the flat benchmark paths of earlier commits -> the modules they are now (benchmarks/MOVED.json)
MOVED = json.loads((ROOT / "benchmarks" / "MOVED.json").read_text())


def _command(recorded: Any) -> str:
    """The recorded command, and, when it names a benchmark by its old flat path, how to run it now."""
    text = str(recorded)
    words = text.split()
    for old, new in MOVED.items():
        if old in words or old.removeprefix("benchmarks/") in words:  # also "cd benchmarks && python NAME.py"
            now = text.replace(f"python {old}", f"python -m {new['module']}").replace(
                f"python3 {old}", f"python -m {new['module']}"
            )
            return f"`{text}` (now `{now}`)" if now != text else f"`{text}` (the script is now `{new['path']}`)"
    return f"`{text}`"


def _source(r: dict[str, Any]) -> str:
    prov = r.get("provenance", {})
    m = prov.get("machine", {})
    commit = r.get("commit", prov.get("commit"))
    command = _command(r.get("command", prov.get("command")))
    if not commit:  # files written before the results harness recorded provenance
        return (
            f"\n_From `benchmarks/results/{r['_file']}`: {command}; the file records "
            f"no commit or machine (written before `guard.core.provenance`)._\n"
        )
    return (
        f"\n_From `benchmarks/results/{r['_file']}`: {command} at commit "
        f"`{str(commit)[:12]}` on {m.get('cores', '?')} cores "
        f"({m.get('torch_threads', '?')} torch threads), {prov.get('finished', '?')}._\n"
    )


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _training(f: dict[str, Any]) -> str:
    """A model's training budget, from its record: epochs and method, and the start when it was not the plain demo model."""
    t = f.get("training") or {}
    if "cpr" in t:  # consistent-prediction rejection on the plain model: no training of its own
        ch = t["radius_choice"]
        return (
            f"none: CPR on the pgd model (next row), radius {ch['radius']:.3g} = {ch['radius'] * 255:.2g}/255 "
            f"({t['cpr']['steps']} PGD steps), "
            f"the largest of {len(ch['rejected'])} rejecting at most {_pct(ch['rate'], 0)} of {ch['n']:,} other "
            "held-out images"
        )
    c = t.get("config") or {}
    text = f"{c.get('epochs', '?')} epochs {c.get('method', f['method'])}"
    start = t.get("start") or ""
    if "variant='robust'" in start:
        text += ", started from the shipped robust variant"
    cal = t.get("reject_calibration")
    if cal:
        before = cal["uncalibrated_on_reported_images"]
        text += (
            f"; reject offset calibrated to {_pct(cal['rate'], 0)} on 1,000 other held-out images "
            f"(uncalibrated: {_pct(before['clean_accuracy'])} clean, {_pct(before['clean_rejected'])} rejected)"
        )
    return text


def _robust_row(label: str, f: dict[str, Any]) -> str:
    iv = f.get("intervals", {})
    return (
        f"| {label} | {f['method']} | {_training(f)} | {f['n']} | "
        f"{_pct(f['clean_accuracy'])}{_ci(iv.get('clean_accuracy'))} | "
        f"{_pct(f['clean_rejected'])} | {_pct(f['robust_accuracy'])}{_ci(iv.get('robust_accuracy'))} | "
        f"{_pct(f['robust_accuracy_with_rejection'])}{_ci(iv.get('robust_accuracy_with_rejection'))} |"
    )


def robust_hardening(r: dict[str, Any]) -> str:
    rows = [
        "| data, eps | method | training | n | clean accuracy [95% CI] | clean rejected | robust accuracy [95% CI] | "
        "robust accuracy with rejection [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part, eps in (("mnist", "0.3"), ("cifar10", "8/255")):
        f = r.get(part)
        if not f:
            continue
        name = "MNIST" if part == "mnist" else "CIFAR-10"
        rows.append(_robust_row(f"{name}, {eps}", f))
        if f.get("plain_at"):
            rows.append(_robust_row(f"{name}, {eps}", f["plain_at"]))
        for alt in (f.get("alternatives") or {}).values():
            rows.append(_robust_row(f"{name}, {eps}", alt))
    attacks = sorted(
        {
            a
            for part in ("mnist", "cifar10")
            if r.get(part)
            for f in [r[part], *(r[part].get("alternatives") or {}).values()]
            for a in f["attacks"]
        }
    )
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


def robust_cpr(r: dict[str, Any]) -> str:
    """The plain adversarially trained model beside the same model with consistent-prediction rejection."""
    rows = [
        "| defence | n | clean accuracy [95% CI] | clean rejected | robust accuracy [95% CI] | "
        "robust accuracy with rejection [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for label, f in (("plain PGD training", r["plain_at"]), ("the same model + CPR", r.get("cpr"))):
        if not f:
            continue
        iv = f["intervals"]
        rows.append(
            f"| {label} | {f['n']} | {_pct(f['clean_accuracy'])}{_ci(iv['clean_accuracy'])} | "
            f"{_pct(f['clean_rejected'])} | {_pct(f['robust_accuracy'])}{_ci(iv['robust_accuracy'])} | "
            f"{_pct(f['robust_accuracy_with_rejection'])}{_ci(iv['robust_accuracy_with_rejection'])} |"
        )
    ch = r["radius_choice"]
    shares = ", ".join(
        f"{k * 255:.2g}/255: {_pct(v)}" for k, v in sorted((float(a), b) for a, b in ch["rejected"].items())
    )
    radius = "none" if ch["radius"] is None else f"{ch['radius'] * 255:.2g}/255"
    text = (
        f"\n\nCPR's radius: {radius}, the largest rejecting at most {_pct(ch['rate'], 0)} of {ch['n']:,} clean images "
        f"held out from training and from the reported ones (rejected there: {shares}). "
    )
    if r.get("cpr"):
        pa = r["cpr"]["per_attack"].get("guard-apgd-consistent", {})
        text += (
            f"The attack that knows the check (`guard-apgd-consistent`) attacked {pa.get('attacked', 0)} images "
            f"and broke {pa.get('broken', 0)} in {pa.get('seconds', 0):,.0f} s."
        )
    return "\n".join(rows) + text + "\n" + _source(r)


def robust_cpr_sweep(r: dict[str, Any]) -> str:
    """Robust accuracy with rejection by eps: CPR under the knowing attack and an oblivious one, the plain model."""
    eps = r["plain"]["eps"]
    rows = ["| model, attack | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    labels = {
        "cpr_knowing_attack": "CPR, the knowing attack (`guard-apgd-consistent`)",
        "cpr_oblivious_apgd_ce": "CPR, guard's APGD-CE alone (knows nothing of the check)",
        "plain": "the plain PGD model (APGD-CE, APGD-T)",
    }
    for key, label in labels.items():
        rows.append(f"| {label} | " + " | ".join(_pct(v) for v in r[key]["robust_accuracy_with_rejection"]) + " |")
    return (
        "\n".join(rows)
        + f"\n\nRobust accuracy with rejection on the first {r['n']} held-out MNIST images, CPR radius {r['radius']:g}, "
        f"budget `{r['budget']}`.\n" + _source(r)
    )


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
        "| model, patch | n | clean accuracy | certified recovery | certified detection | clean flagged | images/s |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(f: dict[str, Any], key: str) -> str:
        return _pct(f[key]) + _ci((f.get("ci95") or {}).get(key))

    def row(label: str, f: dict[str, Any]) -> str:
        speed = (
            f"{f['images_per_second']:g} ({f['threads']} thread{'s' if f['threads'] > 1 else ''})"
            if "threads" in f
            else "n/a"
        )
        return (
            f"| {label} | {f['n']} | {cell(f, 'clean_accuracy')} | {cell(f, 'certified_recovery')} | "
            f"{cell(f, 'certified_detection')} | {cell(f, 'clean_flagged')} | {speed} |"
        )

    for name, f in (r.get("cifar10_models") or {}).items():
        rows.append(row(f"CIFAR-10 `{name}`, {f['patch_side']}x{f['patch_side']} ({_pct(f['patch_area'])})", f))
    for area, f in (r.get("imagenet") or {}).items():
        rows.append(
            row(f"ImageNet `EfficientNet-Lite0`, {f['patch_side']}x{f['patch_side']} ({_pct(f['patch_area'])})", f)
        )
    adaptive = {name: f["adaptive"] for name, f in (r.get("cifar10_models") or {}).items() if f.get("adaptive")}
    if adaptive:
        rows += [
            "",
            "The attacker who knows the masks (`guard.attacks.MaskingPatch`) on the first images of the same sample:",
            "",
            "| model | n | bare model fooled | escapes the flag: certified images | others | changes the recovered label: "
            "certified images | others |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, a in adaptive.items():
            rows.append(
                f"| `{name}` | {a['n']} | {_rate(a['bare_fooled'])} | {_rate(a['evades_flag_on_detection_certified'])} | "
                f"{_rate(a['evades_flag_on_not_detection_certified'])} | "
                f"{_rate(a['recovery_changed_on_recovery_certified'])} | "
                f"{_rate(a['recovery_changed_on_not_recovery_certified'])} |"
            )
    earlier: dict[str, list[str]] = {}
    for name, f in (r.get("cifar10_models") or {}).items():
        if f.get("commit") and f["commit"] != r.get("commit"):
            earlier.setdefault(str(f["commit"])[:12], []).append(f"`{name}`")
    if earlier:
        rows += [
            "",
            "Rows from earlier runs of the study, kept in the file with their own commands: "
            + "; ".join(f"{', '.join(names)} at `{c}`" for c, names in earlier.items())
            + ".",
        ]
    return "\n".join(rows) + "\n" + _source(r)


def patch_flag(r: dict[str, Any]) -> str:
    """The combined flag with the masking detector in, on successful patches (CIFAR-10)."""
    c = r["clean"]
    rows = [
        "| images | n | combined flag (calibrated) | masking alone, certified threshold | masking alone, calibrated |",
        "|---|---|---|---|---|",
        f"| clean (false positives) | {c['n']} | {_rate(c['combined_flagged'])} | "
        f"{_rate(c['masking_flagged_certified'])} | {_rate(c['masking_flagged_calibrated'])} |",
    ]
    for name, a in r["attacks"].items():
        rows.append(
            f"| successful `{name}` ({_rate(a['success_rate'])} of the images) | {a['combined_flagged_on_success']['n']} | "
            f"{_rate(a['combined_flagged_on_success'])} | {_rate(a['masking_flagged_certified_on_success'])} | "
            f"{_rate(a['masking_flagged_calibrated_on_success'])} |"
        )
    ad = r.get("adaptive")
    if ad:
        rows.append(
            f"| `MaskingPatch` aimed at the calibrated masking detector (images the model gets right) | {ad['n']} | "
            f"evades: {_rate(ad['evades_combined_flag'])} | | evades: {_rate(ad['evades_masking_flag'])} |"
        )
    return (
        "\n".join(rows) + f"\n\nModel `{r['model']}`, one {r['patch_side']}x{r['patch_side']} patch; detectors "
        f"{', '.join(r['detectors'])} combined by `{r['combine']}`, calibrated at {_pct(r['fpr_target'], 0)} on "
        f"held-out images; {r['data']}."
        + (
            f" The adaptive attacker fools the bare model on {_rate(ad['bare_fooled'])} of its images and models "
            "only the masking detector, not the others in the combined flag."
            if ad
            else ""
        )
        + "\n"
        + _source(r)
    )


def gan_best_of_k(r: dict[str, Any]) -> str:
    """Best-of-k fooling: the patch GAN's k samples against k universal patches and one patch at k positions."""
    labels = {
        "patch_gan": f"`PatchGAN`: {r['k']} sampled patches",
        "universal_best_of_k": f"{r['k']} `UniversalPatch`es (seeds 0-{r['k'] - 1})",
        "universal_one_patch_k_positions": "one `UniversalPatch` (seed 0) at each try",
    }
    rows = [
        f"| attacker, {r['k']} tries per image (random positions) | fooled by some try | mean single try | best single try |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        f = r[key]
        rows.append(
            f"| {label} | {_rate(f['best_of_k'])} | {_pct(f['mean_single_try'])} | {_pct(f['best_single_try'])} |"
        )
    return (
        "\n".join(rows) + f"\n\nModel `{r['model']}`, one {r['patch_side']}x{r['patch_side']} patch, on the {r['n']} "
        f"images it gets right; {r['data']}.\n" + _source(r)
    )


def patch_escape(r: dict[str, Any]) -> str:
    """A defence fitted on one universal patch against that patch, other universal patches and the patch GAN."""
    labels = {
        "universal_seen": "the `UniversalPatch` it was fitted on (seed 0), new positions",
        "universal_unseen": f"{r['k']} other `UniversalPatch`es (seeds 1-{r['k']})",
        "patch_gan": f"`PatchGAN`: {r['k']} sampled patches",
    }
    rows = [
        f"| attacker ({r['k']} tries per image) | fools, one try | caught among its successes | "
        f"fools and escapes, best of {r['k']} |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        f = r[key]
        rows.append(
            f"| {label} | {_rate(f['fooled_one_try'])} | {_rate(f['caught_on_success_all_tries'])} | "
            f"{_rate(f['fools_and_escapes_best_of_k'])} |"
        )
    return (
        "\n".join(rows) + f"\n\nModel `{r['model']}`, one {r['patch_side']}x{r['patch_side']} patch, on the {r['n']} "
        f"images it gets right. The defence: {r['defence']}; threshold at {_pct(r['fpr_target'], 0)} false positives "
        f"on held-out clean images (on the reported clean images: {_rate(r['clean_flagged_on_reported'])}). "
        f"{r['data']}.\n" + _source(r)
    )


def saliency_patches(r: dict[str, Any]) -> str:
    """The saliency detector's variants and the occlusion test on CIFAR-10 patches: AUROC and the share caught."""
    rep, choice = r["report_split"], r["choice_split"]
    names = [k.removesuffix("_successes") for k in rep if k.endswith("_successes")]
    rows = [
        "| score | AUROC, choice split | "
        + " | ".join(f"AUROC `{n}`" for n in names)
        + " | clean flagged | "
        + " | ".join(f"`{n}` caught" for n in names)
        + " |",
        "|---|---|" + "---|" * (2 * len(names) + 1),
    ]
    for v, e in rep["variants"].items():
        label = f"`{v}`" + (" (default)" if v == r["default_variant"] else "")
        label += " (chosen)" if v == r["chosen_on_choice_split"] else ""
        aurocs = " | ".join("n/a" if e[f"auroc_{n}"] is None else f"{e[f'auroc_{n}']:.3f}" for n in names)
        caught = " | ".join(_rate(e[f"caught_{n}"]) for n in names)
        rows.append(
            f"| {label} | {choice['variants'][v]['auroc_both']:.3f} | {aurocs} | {_rate(e['clean_flagged'])} | {caught} |"
        )
    succ = ", ".join(f"`{n}` {_rate(rep[f'{n}_successes'])}" for n in names)
    return (
        "\n".join(rows) + f"\n\nModel `{r['model']}`, one {r['patch_side']}x{r['patch_side']} patch; successful "
        f"patches on the report split: {succ}. Thresholds at {_pct(r['fpr_target'], 0)} of clean images; "
        f"{r['data']}. AUROC below 0.5: the score ranks patched images *below* clean ones.\n" + _source(r)
    )


def masking_serving_cost(r: dict[str, Any]) -> str:
    """The one-mask round's serving cost: guarded against bare, eager and onnxruntime."""
    rows = ["| runtime | bare (ms) | guarded (ms) | guarded / bare |", "|---|---|---|---|"]
    for runtime, v in r["by_runtime"].items():
        rows.append(f"| {runtime} | {v['bare_ms']:.1f} | {v['guarded_ms']:.1f} | {v['ratio_guarded_over_bare']:.1f} |")
    return (
        "\n".join(rows) + f"\n\n{r['model']}, `{r['detector']}` ({r['masks']} masks), a batch of {r['batch']}, "
        f"{r['threads']} thread, median of {r['reps']} interleaved calls; ONNX parity passed: "
        f"{r['onnx_parity_passed']}.\n" + _source(r)
    )


def _rate(v: dict[str, Any] | None) -> str:
    if not v:
        return "n/a"
    if v.get("rate") is None:
        return "n/a (0 images)"
    return f"{100 * v['rate']:.1f}% ({v['k']}/{v['n']}){_ci(v.get('ci95'))}"


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
        f"calibrated on {r['n_calibration']} other clean images): {_rate(c)}.\n" + _adaptive_line(r) + _source(r)
    )


def _adaptive_line(r: dict[str, Any]) -> str:
    """The same audit's adaptive attacker (it knows the detectors), where the results file records it."""
    a = r.get("adaptive")
    if not a or a.get("evasion") is None:
        return ""
    return (
        f"\nThe same audit's adaptive attacker (knows the detectors; eps {a['eps']:.4g}, n = {a['n']} held-out "
        f"images): misclassified and not flagged {_pct(a['evasion'])} (misclassified {_pct(a['misclassified'])}).\n"
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


def attacks_quick(r: dict[str, Any]) -> str:
    """Success rate of every attack of the quick MNIST audit (the tests' fixture model)."""
    rows = ["| attack | images attacked | success rate |", "|---|---|---|"]
    for name, a in r["attacks"].items():
        rows.append(f"| {name} | {a['n']} | {_pct(a['success_rate'])} |")
    return (
        "\n".join(rows) + f"\n\nModel: {r['config']['model']}; clean accuracy {_pct(r['clean_accuracy_bare'])} on "
        f"{r['config']['test']}.\n" + _source(r)
    )


def imagenet_patch_fooling(r: dict[str, Any]) -> str:
    """Fooling rate by patch area on held-out ImageNet-sample images, EfficientNet-Lite0."""
    methods = ["patch_gan", "patch_gan_paper", "universal_patch", "random_patch"]
    rows = ["| patch area | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for area in sorted(r["fooling"], key=float):
        f = r["fooling"][area]
        rows.append(f"| {_pct(float(area), 0)} | " + " | ".join(_pct(f.get(m)) for m in methods) + " |")
    c = r["config"]
    det = r.get("detection", {})
    lines = (
        "\n".join(rows)
        + f"\n\n{c['n_eval']} evaluation images never seen in training, {c['gan_steps']} training steps "
        f"per patch, clean top-1 {_pct(r['clean_accuracy_eval'])}; patch_gan_paper = the paper's loss weights."
    )
    if det:
        lines += (
            " Detection of the patched images at 1% FPR: "
            + "; ".join(f"{k}: TPR {_pct(v['tpr_at_1fpr'])}, AUROC {_f(v['auroc'])}" for k, v in det.items())
            + "."
        )
    return lines + "\n" + _source(r)


def _steps_file_source(r: dict[str, Any]) -> str:
    """The source line of a file run in steps: its ``command`` field joins every step's command, which the
    table already gives with its rows (the file's ``steps``), so it is not repeated here."""
    return (
        (
            f"\n_From `benchmarks/results/{r['_file']}` (a run in {len(r.get('steps', {}))} steps; each row's command is the "
            f"step's `command` in the file's `steps`); the file records no commit or machine (written before "
            f"`guard.core.provenance`)._\n"
        )
        if not r.get("commit")
        else _source(r)
    )


def _step_source(r: dict[str, Any], step: str) -> str:
    st = r.get("steps", {}).get(step, {})
    return f"`{st.get('command', '?')}`"


def imagenet_fooling(r: dict[str, Any]) -> str:
    """Nguyen et al.'s fooling images on EfficientNet-Lite0, all 1,000 classes (or a subset)."""
    rows = [
        "| method | classes | budget | share >= 99% | share >= 99.99% | median best confidence | command |",
        "|---|---|---|---|---|---|---|",
    ]
    f = r["fooling"]
    for key, step, label in (
        ("gradient", "gradient", "gradient ascent"),
        ("direct", "evolve_direct", "MAP-Elites, direct"),
        ("cppn", "evolve_cppn", "MAP-Elites, CPPN"),
        ("cppn_subset20", "evolve_cppn_subset20", "MAP-Elites, CPPN"),
    ):
        v = f.get(key)
        if not v:
            continue
        budget = f"{v['max_steps']} steps" if "max_steps" in v else f"{v['generations']} generations"
        rows.append(
            f"| {label} | {v['classes']} | {budget} | {_pct(v['share_99'])} | {_pct(v['share_9999'])} | "
            f"{_pct(v['median_conf'], 3)} | {_step_source(r, step)} |"
        )
    return "\n".join(rows) + "\n" + _steps_file_source(r)


def imagenet_feature_adversaries(r: dict[str, Any]) -> str:
    """Sabour et al.'s feature adversaries on EfficientNet-Lite0, with the local-PPCA inlier test."""
    rows = [
        "| layer | delta (/255) | pairs | L-BFGS-B iterations | guide label taken | source label kept | "
        "median distance ratio | local-PPCA inliers |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(layer: str, delta: str, v: dict[str, Any]) -> str:
        return (
            f"| {layer} | {delta} | {v['n']} | {v['max_iter']} | {_pct(v['guide_agreement'])} | {_pct(v['source_agreement'])} | "
            f"{_f(v['distance_ratio_median'], '.2f')} | {_pct(v.get('local_ppca_inlier_share'))} |"
        )

    for layer, by_delta in r["feature_adversary"].items():
        for delta in sorted(by_delta, key=float):
            rows.append(row(layer, delta, by_delta[delta]))
    meta_layer = r.get("feature_adversary_meta", {}).get("layer", "1._fc:input")
    for it, v in sorted(r.get("feature_adversary_iterations", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(row(meta_layer, "10", v))
    a = r.get("art_comparison")
    lines = "\n".join(rows) + "\n"
    if a:
        art = "; ".join(
            f"{x['pgd_iterations']} PGD iterations: ratio {x['ratio_median']:.2f}, {x['seconds_per_pair']:.1f} s/pair"
            for x in a["art_feature_adversaries_pytorch"]
        )
        g = a["guard"]
        lines += (
            f"\nAgainst IBM ART's `FeatureAdversariesPyTorch` on {a['pairs']} pairs (layer {a['layer']}, delta {a['delta']}/255): "
            f"guard {g['lbfgs_iterations']} L-BFGS-B iterations: ratio {g['ratio_median']:.2f}, {g['seconds_per_pair']:.1f} s/pair; "
            f"ART {art} ({_step_source(r, 'art')}).\n"
        )
    return (
        lines + f"\nFeature adversaries: {_step_source(r, 'feature_adversary')}, then "
        f"{_step_source(r, 'feature_adversary_resumed')}.\n" + _steps_file_source(r)
    )


def imagenet_fooling_detection(r: dict[str, Any]) -> str:
    """True-positive rate at 1% FPR of the feature-space detectors on ImageNet fooling images."""
    d = r["detectors_tpr_at_1pct_fpr"]
    sets = [k for k in d["sets"] if k != "clean_pool_fpr_check"]
    rows = [
        "| detector | " + " | ".join(f"{k} fooling images" for k in sets) + " | clean images flagged |",
        "|---" * (len(sets) + 2) + "|",
    ]
    for name, v in d.items():
        if name != "sets" and isinstance(v, dict) and "clean_pool_fpr_check" in v:
            rows.append(
                f"| {name} | " + " | ".join(_pct(v.get(k)) for k in sets) + f" | {_pct(v['clean_pool_fpr_check'])} |"
            )
    return (
        "\n".join(rows)
        + f"\n\nLayer {d['layer']}; fitted on {d['fit']} clean images, calibrated to {_pct(d['fpr'], 0)} FPR on "
        f"{d['calibrate']} others, {d['fooling_images_per_set']} images per set ({_step_source(r, 'detectors')}).\n"
        + _steps_file_source(r)
    )


def layer_statistics(r: dict[str, Any]) -> str:
    """Per input kind, the single CIFAR-10 layer statistic that flags the most at 1% FPR."""
    rows = [
        "| input | images | best single layer (pooling) | TPR at 1% FPR | AUROC | layer statistics tried |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for row in r["rows"]:
        by.setdefault(row["input"], []).append(row)
    for inp, rs in by.items():
        b = max(rs, key=lambda x: x["tpr_at_1pct_fpr"])
        rows.append(
            f"| {inp} | {b['n']} | {b['layer']} ({b['pool']}) | {_pct(b['tpr_at_1pct_fpr'])} | {_f(b['auroc'])} | {len(rs)} |"
        )
    succ = ", ".join(f"{k}: {_pct(v)}" for k, v in r.get("attack_success", {}).items())
    return "\n".join(rows) + f"\n\nAttack success on the demo ResNet-20: {succ}.\n" + _source(r)


def robust_sweep(r: dict[str, Any]) -> str:
    """Robust accuracy of a plain demo model against eps (AutoAttack's components and guard's APGD)."""
    sw = r["sweep"]
    rows = ["| eps | robust accuracy | robust accuracy with rejection |", "|---|---|---|"]
    for e, ra, rr in zip(sw["eps"], sw["robust_accuracy"], sw["robust_accuracy_with_rejection"]):
        rows.append(f"| {e:.4g} | {_pct(ra)} | {_pct(rr)} |")
    return (
        "\n".join(rows) + f"\n\nModel: the {r['data']} demo model ({r['model'].get('class', r['model'].get('spec'))}); "
        f"clean accuracy {_pct(r['clean_accuracy'])} on {r['n']} images; at eps {r['eps']:.4g}: robust accuracy "
        f"{_pct(r['robust_accuracy'])}. Attacks: {', '.join(r['attacks'])}.\n" + _source(r)
    )


def robust_variant(r: dict[str, Any]) -> str:
    """The shipped robust demo variant: robust accuracy with its interval, what broke it, the sanity checks, the sweep."""
    res = r["result"]
    iv = res["intervals"]
    rows = ["| attack (in order, each on what the ones before left) | attacked | broken |", "|---|---|---|"]
    for name, v in res["per_attack"].items():
        rows.append(f"| {name} | {v['attacked']} | {v['broken']} |")
    sw = r.get("sweep")
    sweep = (
        "; the sweep (quick budget, on the command's --sweep-n images) by eps: "
        + ", ".join(f"{e:.4g}: {_pct(a)}" for e, a in zip(sw["eps"], sw["robust_accuracy"]))
        + f" (monotone: {sw['checks']['monotone']}, zero at the largest: {sw['checks']['zero_at_largest']})"
        if sw
        else f"; {r['seconds']:.0f} s"
    )
    return (
        f"Clean accuracy {_pct(res['clean_accuracy'])}{_ci(iv['clean_accuracy'])}, robust accuracy at eps "
        f"{res['eps']:.4g} {_pct(res['robust_accuracy'])}{_ci(iv['robust_accuracy'])} on n = {res['n']} held-out images "
        f"(budget: {res['budget']['steps']} APGD steps, {res['budget']['restarts']} restarts, "
        f"{res['budget']['n_target_classes']} targets, {res['budget']['n_queries']} Square queries).\n\n"
        + "\n".join(rows)
        + f"\n\nSanity checks: {res['checks']}{sweep}.\n"
        + _source(r)
    )


def imagenet_export(r: dict[str, Any]) -> str:
    """The guarded EfficientNet-Lite0 as one ONNX graph: parity and latency against PyTorch eager."""
    e = r["export"]
    rows = ["| batch | PyTorch eager (ms) | onnxruntime (ms) | ratio |", "|---|---|---|---|"]
    for b, v in sorted(e.get("latency_ms", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {b} | {v['eager']:.1f} | {v['onnxruntime']:.1f} | {v['ratio']:.3f} |")
    par = ["| inputs | output | max abs difference | max rel difference | outside tolerance |", "|---|---|---|---|---|"]
    for inputs, outs in e.get("parity_vs_guarded", {}).items():
        for out, v in outs.items():
            if "max_abs" in v:
                par.append(
                    f"| {inputs} | {out} | {v['max_abs']:.2e} | {v['max_rel']:.2e} | {v.get('n_out_of_tol', 0)} |"
                )
            elif "agreement" in v:
                par.append(f"| {inputs} | {out} | agreement {_pct(v['agreement'])} | | |")
    return (
        "\n".join(rows) + f"\n\nONNX opset {e['opset']}, {e['onnx_mb']} MB, heads {', '.join(e['heads']['exported'])}; "
        f"one thread. Parity of the graph against the guarded PyTorch model:\n\n" + "\n".join(par) + "\n" + _source(r)
    )


def stage_costs(r: dict[str, Any]) -> str:
    """Wall time, CPU time and peak resident memory per stage of a benchmark run."""
    rows = ["| stage | wall (s) | CPU (s) | peak RSS (MB) |", "|---|---|---|---|"]
    for name, v in {**r["stages"], "total": r["total"]}.items():
        rows.append(f"| {name} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(rows) + f"\n\n{r.get('threads', '?')} torch thread(s).\n" + _source(r)


#: table name -> (results file, renderer)
def peer_pgd(r: dict[str, Any]) -> str:
    """guard's LinfPGD against torchattacks.PGD, same model, eps, steps and images, one process."""
    runs = r["runs"]
    rows = ["| attack | images/s | success |", "|---|---|---|"]
    for name, label in (
        ("torchattacks", "torchattacks.PGD"),
        ("guard_full_steps", "guard LinfPGD, all steps"),
        ("guard_early_stop", "guard LinfPGD, early stop"),
    ):
        v = runs[name]
        rows.append(f"| {label} | {v['images_per_second']} | {_pct(v['success_rate'])} |")
    return (
        "\n".join(rows)
        + f"\n\nguard / torchattacks (images/s): all steps {r['ratio_guard_full_steps_over_torchattacks']}, "
        f"early stop {r['ratio_guard_early_stop_over_torchattacks']}; {r['images']} images, {r['steps']} steps, eps {r['eps']}, "
        f"{r['threads']} thread(s).\n" + _source(r)
    )


def peer_knn(r: dict[str, Any]) -> str:
    """FAISS (as the kNN detectors use it) against scikit-learn's NearestNeighbors: queries per second."""
    rows = ["| bank rows | method | build s | queries/s |", "|---|---|---|---|"]
    for bank, b in r["banks"].items():
        for method, v in b["methods"].items():
            rows.append(f"| {int(bank):,} | {method} | {v['build_seconds']:.2f} | {v['queries_per_second']} |")
    ratios = ", ".join(f"{int(k):,} rows: {v['ratio_faiss_exact_over_sklearn_brute']}" for k, v in r["banks"].items())
    return (
        "\n".join(rows)
        + f"\n\nFAISS exact / scikit-learn brute force (queries/s): {ratios}; {r['dim']}-d, {r['queries']} queries, "
        f"k={r['k']}, {r['threads']} thread(s).\n" + _source(r)
    )


def peer_onnx(r: dict[str, Any]) -> str:
    """onnxruntime against PyTorch eager, the guarded demo model and the bare one."""
    rows = ["| model | batch | eager ms | onnxruntime ms | onnxruntime / eager |", "|---|---|---|---|---|"]
    for model, per in r["by_batch"].items():
        for b, v in per.items():
            rows.append(
                f"| {model} | {b} | {v['eager_ms']} | {v['onnxruntime_ms']} | {v['ratio_onnxruntime_over_eager']} |"
            )
    return "\n".join(rows) + f"\n\n{r['threads']} thread(s); {r['timing']}.\n" + _source(r)


def peer_guarded(r: dict[str, Any]) -> str:
    """What the detectors cost at serving time: the guarded demo model against the bare one."""
    rows = ["| detectors | bare ms | guarded ms | guarded / bare |", "|---|---|---|---|"]
    for name, v in r["configurations"].items():
        rows.append(f"| {name} | {v['bare_ms']} | {v['guarded_ms']} | {v['ratio_guarded_over_bare']} |")
    return "\n".join(rows) + f"\n\nBatch {r['batch']}, {r['threads']} thread(s); {r['timing']}.\n" + _source(r)


def peer_cppn(r: dict[str, Any]) -> str:
    """CPPN rendering: guard's vectorised pass against a per-pixel Python evaluation (as NEAT libraries run it)."""
    return (
        "| renderer | 28-px images/s |\n|---|---|\n"
        f"| guard (vectorised torch) | {r['guard_render_28px_images_per_second']} |\n"
        f"| per-pixel Python (NEAT-style) | {r['per_pixel_python_28px_images_per_second']} |\n"
        f"\nguard / per-pixel: {r['ratio_guard_render_over_per_pixel']}; largest pixel difference "
        f"{r['max_abs_difference_vs_per_pixel']:.1e}.\n" + _source(r)
    )


def peer_certify(r: dict[str, Any]) -> str:
    """guard's certify beside PatchCleanser's reference logic: throughput and agreement."""
    g, pc = r["guard"], r["patchcleanser"]
    cr = r["certified_recovery"]
    rows = [
        "| implementation | images/s | certified recovery |",
        "|---|---|---|",
        f"| PatchCleanser reference (full two-mask map) | {pc['images_per_second']:g} | {_pct(cr['patchcleanser'])} |",
        f"| guard `certify` | {g['images_per_second']:g} | {_pct(cr['guard'])} |",
    ]
    agree = not r["certified_recovery_differs_on"] and not r["recovered_label_differs_on"]
    lay = r["forward_images_per_second_by_layout"]
    return (
        "\n".join(rows)
        + f"\n\nguard / reference: {r['ratio_guard_over_patchcleanser']:g}x on {r['n']} CIFAR-10 test images, model "
        f"`{r['model']}`, {r['masks']} masks ({r['patch_side']}-px patch), {r['threads']} thread(s); mask sets identical: "
        f"{r['mask_sets_identical']}; certificates and recovered labels "
        + (
            "identical on every image"
            if agree
            else f"differ on images {r['certified_recovery_differs_on']} / {r['recovered_label_differs_on']}"
        )
        + f". Forward passes/s on masked images: {lay['nchw']:g} (NCHW), {lay['channels_last']:g} (channels-last, what guard feeds).\n"
        + _source(r)
    )


def peer_patch_art(r: dict[str, Any]) -> str:
    """guard's patch attacks beside ART's AdversarialPatchPyTorch, at ART's training time as the budget."""
    art = r["art"]
    rows = [
        "| attack | fooling rate (mean ± std) | fit seconds | / ART |",
        "|---|---|---|---|",
        f"| ART AdversarialPatchPyTorch ({art['iterations']} iterations) | {_pct(art['fooling_rate'])} ± "
        f"{100 * art['std']:.1f} | {art['seconds']:.0f} | 1 |",
    ]
    for name, g in r["guard"].items():
        rows.append(
            f"| guard {name} | {_pct(g['fooling_rate'])} ± {100 * g['std']:.1f} | {g['fit_seconds']:.0f} | "
            f"{g['ratio_over_art']:.2f} |"
        )
    return (
        "\n".join(rows)
        + f"\n\nMNIST demo model, one {r['side_px']}-px patch ({_pct(r['area'], 0)} of the image), trained on "
        f"{r['train_images']} images and measured on {r['eval_images']} others over {r['reps']} repetitions, "
        f"{r['threads']} thread(s); / ART is the fooling rate over ART's.\n" + _source(r)
    )


def peer_feature_art(r: dict[str, Any]) -> str:
    """Sabour et al.'s feature adversaries: guard beside ART's FeatureAdversaries (NumPy and PyTorch)."""
    g, an = r["guard"], r["art_numpy"]
    rows = [
        "| implementation | images | iterations | seconds | median feature-distance ratio | guide's label |",
        "|---|---|---|---|---|---|",
        f"| guard | {g['images']} | {g['max_iter']} | {g['seconds']:.1f} | {g['median_distance_ratio']:.3f} | "
        f"{_pct(g['guide_label_agreement'])} |",
        f"| ART FeatureAdversariesNumpy | {an['images']} | {an['maxiter']} | {an['seconds']:.1f} | "
        f"{an['median_distance_ratio']:.3f} | n/a |",
    ]
    for a in r["art_pytorch"]:
        rows.append(
            f"| ART FeatureAdversariesPyTorch{' (equal time)' if a['equal_time'] else ''} | {a['images']} | "
            f"{a['pgd_iterations']} | {a['seconds']:.1f} | {a['median_distance_ratio']:.3f} | "
            f"{_pct(a['guide_label_agreement'])} |"
        )
    return (
        "\n".join(rows)
        + f"\n\nMNIST demo model, layer `{r['layer']}`, L-inf {r['delta']:g}, {r['threads']} thread(s); lower ratio = "
        f"closer to the guide's features. On ART NumPy's {an['images']} images guard took "
        f"{an['guard_same_images_seconds']:.2f} s (ratio {an['guard_same_images_median_distance_ratio']:.3f}).\n"
        + _source(r)
    )


def scale_inference_memory(r: dict[str, Any]) -> str:
    """Peak memory of predicting 224-px images with and without guard's batch cap."""
    rows = ["| mode | batch | peak RSS MiB | seconds |", "|---|---|---|---|"]
    for name, v in r["modes"].items():
        rows.append(f"| {name} | {v['batch']} | {v['peak_rss_mib']:.0f} | {v['seconds']:.1f} |")
    return (
        "\n".join(rows)
        + f"\n\nUncapped / capped peak RSS: {r['ratio_peak_rss_uncapped_over_capped']}; {r['images']} images at "
        f"{r['px']} px, {r['threads']} thread(s).\n" + _source(r)
    )


def masking_scores(r: dict[str, Any]) -> str:
    """One-mask scores at a calibrated false-positive rate: clean and successful patches, on the reported split."""
    names = list(r["thresholds"])
    label = {s: f"`{s}`" + (" (chosen)" if s == r["chosen_on_choice_split"] else "") for s in names}
    rows = [
        "| images | n | " + " | ".join(label[s] for s in names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| clean (false positives) | {r['clean_flagged_report'][names[0]]['n']} | "
        + " | ".join(_rate(r["clean_flagged_report"][s]) for s in names)
        + " |",
    ]
    for name, a in r["attacks"].items():
        rep = a["report"]
        rows.append(
            f"| successful `{name}` | {rep['success']['k']} | " + " | ".join(_rate(rep[s]) for s in names) + " |"
        )
    return (
        "\n".join(rows) + f"\n\nModel `{r['model']}`, one {r['patch_side']}x{r['patch_side']} patch, "
        f"{r['masks']} masks; every threshold at {_pct(r['fpr_target'], 0)} of clean calibration images; "
        f"{r['data']}. Not adaptive: no attacker here knows the score.\n" + _source(r)
    )


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "robust_hardening": ("robust_hardening.json", robust_hardening),
    "robust_cpr_cifar10": ("robust_cpr_cifar10.json", robust_cpr),
    "robust_cpr_cifar10_r1": ("robust_cpr_cifar10_r1.json", robust_cpr),
    "robust_cpr_sweep_mnist": ("robust_cpr_sweep_mnist.json", robust_cpr_sweep),
    "online_cost": ("bench_online_harden.json", online_cost),
    "mutants": ("mutants.json", mutants),
    "certified_patches": ("certified_patches.json", certified_patches),
    "patch_flag_cifar10": ("patch_flag_cifar10.json", patch_flag),
    "patch_flag_cifar10_occlusion": ("patch_flag_cifar10_occlusion.json", patch_flag),
    "gan_best_of_k_cifar10": ("gan_best_of_k_cifar10.json", gan_best_of_k),
    "patch_escape_cifar10": ("patch_escape_cifar10.json", patch_escape),
    "saliency_patches_cifar10": ("saliency_patches_cifar10.json", saliency_patches),
    "masking_serving_cost": ("masking_serving_cost.json", masking_serving_cost),
    "masking_scores_cifar10": ("masking_scores_cifar10.json", masking_scores),
    "detection_mnist_full": ("detection_by_strength_mnist_full.json", detection_by_strength),
    "adaptive_mnist": ("adaptive_mnist_n32.json", adaptive),
    "attacks_mnist_quick": ("audit-mnist-quick.json", attacks_quick),
    "imagenet_patch_fooling": ("imagenet_patch.json", imagenet_patch_fooling),
    "imagenet_fooling": ("imagenet_feature_fooling.json", imagenet_fooling),
    "imagenet_feature_adversaries": ("imagenet_feature_fooling.json", imagenet_feature_adversaries),
    "imagenet_fooling_detection": ("imagenet_feature_fooling.json", imagenet_fooling_detection),
    "cifar10_layer_statistics": ("cifar10_layer_statistics.json", layer_statistics),
    "robust_sweep_mnist": ("robust_eval_mnist_demo.json", robust_sweep),
    "robust_sweep_cifar10": ("robust_eval_cifar10_demo.json", robust_sweep),
    "robust_variant_cifar10": ("robust_eval_cifar10_pgd3ep.json", robust_variant),
    "robust_budget_standard_cifar10": ("robust_eval_cifar10_robust_standard_n100.json", robust_variant),
    "robust_budget_cpu_cifar10": ("robust_eval_cifar10_robust_cpu_n100.json", robust_variant),
    "detection_cifar10_quick": ("detection_by_strength_cifar10_quick.json", detection_by_strength),
    "detection_cifar10_robust_quick": ("detection_by_strength_cifar10_robust_quick.json", detection_by_strength),
    "imagenet_export": ("imagenet_patch.json", imagenet_export),
    "imagenet_patch_stages": ("imagenet_patch.json", stage_costs),
    "peer_pgd": ("pgd_vs_torchattacks.json", peer_pgd),
    "peer_knn": ("knn_faiss_vs_sklearn.json", peer_knn),
    "peer_onnx": ("onnxruntime_vs_eager.json", peer_onnx),
    "peer_guarded": ("guarded_vs_bare.json", peer_guarded),
    "peer_cppn": ("cppn_vs_per_pixel.json", peer_cppn),
    "peer_certify": ("certify_vs_patchcleanser.json", peer_certify),
    "peer_patch_art": ("patch_gan_vs_art.json", peer_patch_art),
    "peer_feature_art": ("feature_adversary_vs_art.json", peer_feature_art),
    "scale_inference_memory": ("inference_batch_memory.json", scale_inference_memory),
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
    g.add_argument("--list", action="store_true", help="print the names of the tables, one a line")
    p.add_argument(
        "--docs",
        nargs="+",
        default=None,
        help="documents to process (default: DOCS)",
    )
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(TABLES))
        return 0
    docs = [Path(d) for d in args.docs] if args.docs else [ROOT / d for d in DOCS]
    stale = {d.name: process(d, args.write) for d in docs}
    bad = {d: s for d, s in stale.items() if s}
    if args.check and bad:
        print(f"tables differ from their results files: {bad}; run tools/results_tables.py --write", file=sys.stderr)
        return 1
    if args.check and not args.docs:
        placed = {m["name"] for d in docs for m in BLOCK.finditer(d.read_text())}
        if set(TABLES) - placed:
            print(f"tables in no document: {sorted(set(TABLES) - placed)}", file=sys.stderr)
            return 1
    print(
        "rewrote " + ", ".join(f"{d}: {s}" for d, s in bad.items()) if bad else "all tables match their results files"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
