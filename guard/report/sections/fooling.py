"""Section "Fooling images": one image per class and method, with the model's confidence."""

from __future__ import annotations

import numpy as np

from guard.report.html import figure, strip_table, table
from guard.report.sections.common import Section, SectionWriter, image_row
from guard.report.source import AuditFolder
from guard.report.text import attack_title, confidence, finite, label, method_title, num, pct, seconds

__all__ = ["build", "best_per_class"]

NAMES = ("fooling_gradient", "fooling_direct", "fooling_cppn")
MAX_CLASSES = 20


def best_per_class(labels: np.ndarray, conf: np.ndarray, classes: int) -> list[int | None]:
    """For each class < ``classes``: the index of its most confident image (None: no image aims at it)."""
    out: list[int | None] = []
    labels, conf = (
        np.asarray(labels).reshape(-1),
        np.nan_to_num(np.asarray(conf, dtype=np.float64).reshape(-1), nan=-1.0),
    )
    for c in range(classes):
        idx = np.nonzero(labels == c)[0]
        out.append(int(idx[np.argmax(conf[idx])]) if idx.size else None)
    return out


def build(src: AuditFolder) -> Section | None:
    entries = {n: src.attack(n) for n in NAMES if src.attack(n)}
    if not entries:
        return None
    w = SectionWriter(src, "fooling", "Fooling images")
    w.add(
        "<p>Nguyen et al. (2015): images made from nothing, by gradient ascent or by evolution (direct pixel encoding, CPPN "
        "pattern encoding), that the model labels as a class with near-certain confidence.</p>"
    )
    k = int(finite(src.section("model", "num_classes")) or 0)
    rows = []
    for n, e in entries.items():
        got = e.get("classes_fooled")
        count = len(got) if isinstance(got, list) else None
        tr = e.get("transfer") if isinstance(e.get("transfer"), dict) else {}
        of = finite(e.get("classes_attacked")) or k  # a model with many classes is attacked on a sample of them
        rows.append(
            [
                method_title(n),
                f"{num(count) if count is not None else pct(e.get('success_rate'))}/{int(of) if of else '?'}",
                confidence(e.get("median_confidence")),
                confidence(e.get("min_confidence")),
                num(e.get("generations", e.get("steps"))),
                num(e.get("n")),
                seconds(e.get("seconds")),
                pct(tr.get("same_label")) if tr else "-",
            ]
        )
    thr = next((finite(e.get("threshold")) for e in entries.values() if finite(e.get("threshold"))), None)
    w.add(
        table(
            [
                "method",
                f"classes at >= {pct(thr, 2)}",
                "median confidence",
                "lowest confidence",
                "generations / steps",
                "images",
                "time",
                "second model agrees",
            ],
            rows,
        ),
        w.cmd([f"attacks.{n}" for n in entries]),
    )
    strips = []
    for n in entries:
        art = w.artifact(f"attack_{n}", f"the {attack_title(n)}", needs=("x_adv", "label", "confidence"))
        if art is None:
            continue
        classes = k or int(np.max(art["label"])) + 1 if art["label"].size else k
        best = best_per_class(art["label"], art["confidence"], min(classes, MAX_CLASSES))
        picks = [(c, j) for c, j in enumerate(best) if j is not None]
        if not picks:
            continue
        conf = art["confidence"]
        caps = [f"{label(c, w.names)}: {confidence(conf[j])}" for c, j in picks]
        hit = [thr is not None and float(conf[j]) >= thr for _, j in picks]
        strips.append(image_row(method_title(n), art["x_adv"][[j for _, j in picks]], caps, hit))
    if strips:
        more = f" (the first {MAX_CLASSES} of {k} classes)" if k > MAX_CLASSES else ""
        w.add(
            figure(
                strip_table(strips),
                f"One image per class{more} and method: the most confident image the model labels as that class, captioned "
                "with the class and the model's confidence (red: at or above the threshold). None of them looks like its class "
                "to a person; a model that trusts its confidence here can be fed anything.",
                w.cmd([f"attacks.{n}" for n in entries], [f"attack_{n}" for n in entries]),
            )
        )
    return w.done()
