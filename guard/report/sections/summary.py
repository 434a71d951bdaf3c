"""Section "Summary": what fooled the model and what caught it, in words, from the report's numbers.

Every sentence is generated from report.json; nothing is written that the numbers do not say.
The attack overview table puts each attack's success rate next to how the combined detector
(the one ``guard.wrap`` flags with) does on it.
"""

from __future__ import annotations

from guard.report.html import Raw, esc, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.source import AuditFolder
from guard.report.text import attack_title, finite, method_title, num, pct, rate_ci, seconds

__all__ = ["build"]

GRADIENT, PATCHES = ("fgsm", "pgd_minimal", "pgd", "pgd_confident"), ("universal_patch", "patch_gan", "random_patch")
FOOLING = ("fooling_gradient", "fooling_direct", "fooling_cppn")


def _fooled(src: AuditFolder) -> list[str]:
    out = []
    grads = [(n, src.attack(n)) for n in GRADIENT if src.attack(n)]
    if grads:
        eps = next(
            (
                finite((e.get("params") or {}).get("eps"))
                for _, e in grads
                if finite((e.get("params") or {}).get("eps"))
            ),
            None,
        )
        parts = [f"{attack_title(n)} {pct(e.get('success_rate'))}" for n, e in grads]
        budget = f" within an L-inf budget of {num(eps)}" if eps is not None else ""
        out.append(f"Gradient attacks{budget} changed the model's label on {', '.join(parts)} of held-out images.")
    patches = [(n, src.attack(n)) for n in PATCHES if src.attack(n)]
    if patches:
        area = next((finite(e.get("area")) for _, e in patches if finite(e.get("area"))), None)
        parts = [
            f"{attack_title(n)} {pct(e.get('success_rate'))}"
            for n, e in sorted(patches, key=lambda t: -(finite(t[1].get("success_rate")) or 0))
        ]
        where = f"covering {pct(area, 0)} of the image" if area is not None else ""
        out.append(
            f"A visible patch {where} at a random place fooled it on: {', '.join(parts)} of images "
            "(the random noise patch is the baseline a learned patch must beat)."
        )
    fa = src.attack("feature_adversary")
    if fa:
        dr = (fa.get("distance_ratio") or {}).get("median")
        out.append(
            f"Feature adversaries at layer {fa.get('layer', '?')} (each pixel moved by at most {num(fa.get('delta'))}) are labelled "
            f"as their guide image in {pct(fa.get('guide_label_agreement', fa.get('success_rate')))} of cases; their features sit "
            f"at a median {num(dr, 2)} of the source's distance to the guide."
        )
    fool = [(n, src.attack(n)) for n in FOOLING if src.attack(n)]
    if fool:
        k = int(finite(src.section("model", "num_classes")) or 0)
        thr = next((finite(e.get("threshold")) for _, e in fool if finite(e.get("threshold"))), None)
        parts = []
        for n, e in fool:
            got = e.get("classes_fooled")
            count = len(got) if isinstance(got, list) else round((finite(e.get("success_rate")) or 0) * k)
            parts.append(f"{method_title(n)} {count}/{k or '?'}")
        out.append(
            f"Fooling images that no person would recognise reached {pct(thr, 2) if thr else 'the threshold'} confidence; "
            f"classes reached: {', '.join(parts)}."
        )
    return out


def _caught(src: AuditFolder) -> list[str]:
    comb = src.section("detectors", "combined")
    if not isinstance(comb, dict) or not comb:
        return []
    info = src.section("detectors_info") or {}
    target = finite((info.get("calibration") or {}).get("target_fpr"))
    clean = finite((info.get("clean_flag_rate") or {}).get("combined"))
    rows = [(n, e) for n, e in comb.items() if isinstance(e, dict)]
    flagged = sorted(
        ((finite(e.get("tpr_at_threshold")), n, e) for n, e in rows if finite(e.get("tpr_at_threshold")) is not None),
        key=lambda t: -t[0],
    )
    out = []
    if flagged:
        fpr = next(
            (
                (e.get("operating_point") or {}).get("fpr")
                for _, _, e in flagged
                if (e.get("operating_point") or {}).get("fpr")
            ),
            None,
        )
        realised = rate_ci(fpr) if fpr else pct(clean)
        head = (
            (
                f"At its calibrated threshold (target {pct(target, 0)} false positives; {realised} clean held-out images "
                "flagged) the combined detector flags "
            )
            if target is not None
            else "The combined detector flags "
        )
        out.append(
            head
            + ", ".join(
                f"{rate_ci((e.get('operating_point') or {}).get('tpr')) if (e.get('operating_point') or {}).get('tpr') else pct(t, 0)}"
                f" of successful {attack_title(n)}"
                for t, n, e in flagged
            )
            + " (95% intervals and image counts)."
        )
        aur = [(finite(e.get("auroc")), n) for _, n, e in flagged if finite(e.get("auroc")) is not None]
        if aur:
            lo, hi = min(aur), max(aur)
            out.append(
                f"Hardest to detect: {attack_title(lo[1])} (AUROC {num(lo[0])}); easiest: {attack_title(hi[1])} (AUROC {num(hi[0])})."
            )
    dets = src.section("detectors")
    best = []
    for attack in (n for _, n, _ in flagged):
        scores = [(finite(((dets.get(d) or {}).get(attack) or {}).get("auroc")), d) for d in dets if d != "combined"]
        scores = [s for s in scores if s[0] is not None]
        if scores:
            a, d = max(scores)
            best.append(f"{attack_title(attack)}: {d} ({num(a)})")
    if best:
        out.append("Best single detector per attack (AUROC): " + "; ".join(best) + ".")
    return out


def _adaptive(src: AuditFolder) -> list[str]:
    a = src.section("adaptive")
    if not isinstance(a, dict) or finite(a.get("evasion")) is None:
        return []
    head = next((e for e in a.get("per_eps") or [] if e.get("eps") == a.get("eps")), {})
    plain = f" (plain PGD, which does not know them: {pct(head.get('oblivious_evasion'))})" if head else ""
    mis = (
        f" It misclassified {pct(a.get('misclassified'))} of them."
        if finite(a.get("misclassified")) is not None
        else ""
    )
    return [
        f"An attacker who knows the detectors (budget {num(a.get('eps'))}) got {pct(a.get('evasion'))} of "
        f"{num(a.get('n'))} images misclassified and unflagged{plain}.{mis}"
    ]


def _robust(src: AuditFolder) -> list[str]:
    r = src.section("robust")
    if not isinstance(r, dict) or finite(r.get("robust_accuracy")) is None:
        return []
    rej = (
        (
            f" with rejection ({pct(r.get('robust_accuracy'))} counting rejected attacked images as errors; "
            f"{pct(r.get('clean_rejected'))} of clean images rejected)"
        )
        if r.get("reject_model")
        else ""
    )
    return [
        f"Under AutoAttack's components at budget {num(r.get('eps'), 4)}, {pct(r.get('robust_accuracy_with_rejection'))} of "
        f"{num(r.get('n'))} images stay correctly classified{rej} (clean: {pct(r.get('clean_accuracy'))})."
    ]


def _after(src: AuditFolder) -> list[str]:
    out = []
    h = src.section("harden")
    if isinstance(h, dict) and isinstance(h.get("rounds"), list) and h["rounds"]:
        base, last = h.get("baseline") or {}, h["rounds"][-1]
        k = h.get("num_classes", "?")
        out.append(
            f"Hardening ({len(h['rounds'])} round(s) with a reject class): clean accuracy {pct(base.get('clean_accuracy'))} -> "
            f"{pct(last.get('clean_accuracy'))}; classes with fresh fooling images at >= 99% confidence "
            f"{num(base.get('fooling_classes_ge99_count'))}/{k} -> {num(last.get('fooling_classes_ge99_count'))}/{k}."
        )
    e = src.section("export")
    if isinstance(e, dict):
        parity = e.get("parity") if isinstance(e.get("parity"), dict) else {}
        ok = [v.get("passed") for v in parity.values() if isinstance(v, dict)]
        lat = (e.get("latency_ms") or {}).get("batch_1") or {}
        ratio = finite(lat.get("ratio"))
        verdict = (
            "within tolerance on every output"
            if ok and all(ok)
            else f"out of tolerance on {sum(not v for v in ok)} output(s)"
            if ok
            else "not checked"
        )
        full = e.get("parity_full") if isinstance(e.get("parity_full"), dict) else {}
        off = [
            f"{k} on {name}"
            for name, figs in full.items()
            if isinstance(figs, dict)
            for k, v in figs.items()
            if isinstance(v, dict) and v.get("passed") is False and not k.startswith("flag")
        ]
        if full:
            verdict += f"; on every image set, {'out of tolerance: ' + ', '.join(off) if off else 'within tolerance'}"
            if e.get("flags_identical") is False:
                verdict += (
                    ", flags differ only on calibration-borderline images"
                    if e.get("flags_identical_except_borderline")
                    else ", flags differ beyond calibration-borderline images"
                )
        speed = f"; onnxruntime takes {num(ratio, 2)}x PyTorch's time per single image" if ratio is not None else ""
        out.append(
            f"Export: one ONNX graph ({len(e.get('outputs') or [])} outputs), PyTorch-vs-onnxruntime parity {verdict}{speed}."
        )
    return out


def _overview(src: AuditFolder) -> Raw | None:
    attacks = src.section("attacks")
    if not isinstance(attacks, dict) or not attacks:
        return None
    comb = src.section("detectors", "combined") or {}
    rows = []
    for n, e in attacks.items():
        if not isinstance(e, dict):
            continue
        c = comb.get(n) if isinstance(comb, dict) else None
        c = c if isinstance(c, dict) else {}
        op = c.get("operating_point") if isinstance(c.get("operating_point"), dict) else {}
        strength = " ".join(b for b in (e.get("strength"), "(held out)" if e.get("held_out") else "") if b) or "-"
        rows.append(
            [
                attack_title(n),
                strength,
                pct(e.get("success_rate")),
                num(e.get("n")),
                rate_ci(op.get("tpr")) if op.get("tpr") else (pct(c.get("tpr_at_threshold"), 0) if c else "-"),
                num(c.get("auroc")) if c else "-",
            ]
        )
    return table(
        ["attack", "strength", "success rate", "images", "flagged at threshold [95% CI] of n", "combined AUROC"], rows
    )


def build(src: AuditFolder) -> Section | None:
    fooled, caught, after = _fooled(src) + _robust(src), _caught(src) + _adaptive(src), _after(src)
    if not (fooled or caught or after or src.section("model")):
        return None
    w = SectionWriter(src, "summary", "Summary")
    m = src.section("model") or {}
    if m:
        w.add(
            f"<p>{esc(m.get('name', 'The model'))} labels {esc(pct(m.get('clean_accuracy')))} of the "
            f"{esc(num((m.get('data') or {}).get('test')))} held-out images correctly.</p>"
        )
    for title, items in (("What fooled it", fooled), ("What caught it", caught), ("Hardening and export", after)):
        if items:
            w.add(f'<h3>{esc(title)}</h3><ul class="summary">' + "".join(f"<li>{esc(s)}</li>" for s in items) + "</ul>")
    ov = _overview(src)
    if ov is not None:
        w.add(
            "<h3>Attacks at a glance</h3>",
            ov,
            "<p>Success rate: the share of images on which the attack reached its goal (a changed label; for fooling images, "
            "a class at the confidence threshold). Combined AUROC: how well the combined detector's score separates the "
            "successful adversarial images from clean held-out ones (0.5 = chance, 1 = perfect).</p>",
            w.cmd(["attacks.*.success_rate", "detectors.combined.*"]),
        )
    w.add(_status(src))
    return w.done()


def _status(src: AuditFolder) -> str:
    parts = []
    errors = src.section("errors")
    if isinstance(errors, dict):
        for step, msg in errors.items():
            if step != "report":
                parts.append(f'<p class="note error">Step {esc(step)} failed: {esc(msg)}</p>')
    skipped = src.section("skipped")
    if isinstance(skipped, dict):
        for step, why in skipped.items():
            parts.append(f'<p class="note info">Step {esc(step)} was skipped: {esc(why)}.</p>')
    timings = src.section("timings")
    if isinstance(timings, dict) and timings:
        total = sum(v for v in (finite(t) for t in timings.values()) if v is not None)
        parts.append(
            "<p>Time per step: "
            + esc(", ".join(f"{k} {seconds(v)}" for k, v in timings.items()))
            + f" (total {esc(seconds(total))}).</p>"
        )
    return "".join(parts)
