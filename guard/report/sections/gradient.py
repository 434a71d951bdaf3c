"""Section "Gradient attacks": FGSM and PGD at each strength, the held-out peer attacks, examples with the perturbation magnified.

One table row per attack with its strength (minimal / full / confident / minimal-norm, from
``report["attacks"][NAME]["strength"]``) and whether it is a held-out peer attack (torchattacks),
so that the detection figures further down can be read against how strong each attack was.
"""

from __future__ import annotations

import numpy as np

from guard.core.registry import attack_names
from guard.report.html import esc, figure, strip_table, table
from guard.report.images import perturbation
from guard.report.sections.common import Section, SectionWriter, example_positions, image_row
from guard.report.source import AuditFolder
from guard.report.text import attack_title, label, num, pct, seconds

__all__ = ["build", "attack_examples"]

NAMES = attack_names(kind="gradient", held_out=False)
HELD_OUT = attack_names(kind="gradient", held_out=True)
SHOWN = 8
STRENGTH_WORDS = {
    "minimal": "minimal: stops at the first misclassified step",
    "full": "full: no early stop",
    "confident": "confident: maximises the wrong class's probability",
    "minimal-norm": "minimal-norm: smallest change",
}


def attack_examples(
    w: SectionWriter,
    name: str,
    clean: dict | None,
    *,
    shown: int = SHOWN,
    perturb: bool = True,
    what: str = "adversarial",
    successes_first: bool = True,
) -> list:
    """Strip rows for attack ``name``: (clean,) adversarial (, perturbation) of the first held-out images.

    With ``successes_first`` the images where the attack succeeded come first (else the first
    ``shown`` in order, so that several attacks line up column by column); captions give the
    model's label before and after.
    """
    art = w.artifact(f"attack_{name}", f"the {attack_title(name)} examples", needs=("x_adv",))
    if art is None:
        return []
    x_adv, ok = art["x_adv"], art.get("success")
    n_clean = clean["x"].shape[0] if clean is not None else 0
    pos = example_positions(art.get("test_index"), n_clean)
    if pos:
        keys = sorted(pos, key=lambda k: (successes_first and ok is not None and not bool(ok[pos[k]]), k))[:shown]
        js = [pos[k] for k in keys]
    else:  # no clean images to pair with: the first adversarial images alone
        keys, js = [], list(range(min(shown, x_adv.shape[0])))
    if not js:
        return []
    y = art.get("y")
    pred = art.get("pred")
    adv = x_adv[js]
    fooled = [bool(ok[j]) if ok is not None else False for j in js]
    caps = []
    for j, f in zip(js, fooled):
        before = label(y[j], w.names) if y is not None else "?"
        after = label(pred[j], w.names) if pred is not None else ("changed" if f else "same")
        caps.append(f"{before} → {after}" if f else f"{before} (held)")
    rows = []
    if keys and clean is not None:
        cx = clean["x"][keys]
        cy = clean.get("y")
        rows.append(image_row("clean", cx, [f"label {label(cy[k], w.names)}" if cy is not None else "" for k in keys]))
    rows.append(image_row(what, adv, caps, fooled, alt=f"{attack_title(name)} {what}"))
    if perturb and keys and clean is not None:
        pert, scales = [], []
        for k, j in zip(keys, js):
            p, s = perturbation(x_adv[j], clean["x"][k])
            pert.append(p)
            scales.append(s)
        linf = [float(np.abs(x_adv[j] - clean["x"][k]).max()) for k, j in zip(keys, js)]
        rows.append(
            image_row(
                "change, magnified",
                np.stack(pert),
                [f"x{s:.1f}, max {m:.2f}" for s, m in zip(scales, linf)],
                alt=f"{attack_title(name)} perturbation",
            )
        )
    return rows


def _overview(w: SectionWriter, entries: dict[str, dict]) -> None:
    """One table row per attack: strength, held out, success, eps, steps, distances, time."""
    rows = []
    for n, e in entries.items():
        p = e.get("params") or {}
        steps = e.get("mean_steps_taken")
        rows.append(
            [
                attack_title(n),
                STRENGTH_WORDS.get(e.get("strength"), e.get("strength") or "-"),
                "yes" if e.get("held_out") else "no",
                pct(e.get("success_rate")),
                pct(e.get("success_rate_on_correct")),
                num(e.get("n")),
                num(p.get("eps")),
                num(steps, 3) if steps is not None else num(p.get("steps", p.get("n_queries", 1))),
                num(e.get("linf_median")),
                num(e.get("l2_median")),
                pct(e.get("wrong_confidence_median")),
                seconds(e.get("seconds")),
            ]
        )
    w.add(
        table(
            [
                "attack",
                "strength",
                "held out",
                "success (all)",
                "success (correctly classified)",
                "images",
                "eps",
                "steps (mean)",
                "median L-inf",
                "median L2",
                "median wrong-class confidence",
                "time",
            ],
            rows,
        ),
        w.cmd([f"attacks.{n}" for n in entries]),
    )


def _examples(w: SectionWriter, entries: dict[str, dict]) -> None:
    """Per (not held-out) attack: clean images, their adversarial versions and the change magnified."""
    ex = w.src.artifact("examples")
    if ex is None:
        w.artifact("examples", "the clean images next to the adversarial ones")
    for n in entries:
        strips = attack_examples(w, n, ex)
        if len(strips) == 3:
            w.add(
                figure(
                    strip_table(strips),
                    f"{attack_title(n)}: clean held-out images (top; those the attack fooled first), their adversarial versions "
                    "(middle; a red caption 'a → b' means the model's label changed from a to b) and the change itself (bottom), "
                    "shown around grey and magnified by the factor in the caption so that it is visible. Look at how small the "
                    "change is compared with what it does to the label.",
                    w.cmd([f"attacks.{n}"], [f"attack_{n}", "examples"]),
                )
            )
        elif strips:
            w.add(
                figure(
                    strip_table(strips),
                    f"{attack_title(n)}: adversarial images (a red caption 'a → b' means the model's label "
                    "changed from a to b).",
                    w.cmd([f"attacks.{n}"], [f"attack_{n}"]),
                )
            )


def build(src: AuditFolder) -> Section | None:
    entries = {n: src.attack(n) for n in NAMES + HELD_OUT if src.attack(n)}
    if not entries:
        return None
    w = SectionWriter(src, "gradient", "Gradient attacks (FGSM, PGD)")
    w.add(
        "<p>Small changes to every pixel, found by following the model's gradient: FGSM takes one step, PGD many "
        "(L-inf: no pixel moves by more than eps). How hard an example is to detect depends on how far past the decision "
        "boundary it goes, so PGD runs at three strengths: early-stopped (minimal: each image stops at its first "
        "misclassified step), full (40 steps, as torchattacks and the detection papers run it) and confidence-maximising "
        "(CCAT's protocol). Held-out rows are peer attacks from torchattacks that guard was never tuned on; CW-L2 and "
        "DeepFool look for the smallest change (minimal-norm, no eps).</p>"
    )
    _overview(w, entries)
    budgets = [f"{attack_title(n)}: {e['budget']}" for n, e in entries.items() if isinstance(e.get("budget"), str)]
    if budgets:
        w.add("<p>Held-out attack budgets (CPU): " + esc("; ".join(budgets)) + ".</p>")
    _examples(w, {n: e for n, e in entries.items() if n in NAMES})
    return w.done()
