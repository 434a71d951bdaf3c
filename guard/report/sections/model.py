"""Section "Model and data": what was audited, on which images, and the held-out examples."""

from __future__ import annotations

from guard.report.html import figure, table, tile_rows
from guard.report.sections.common import Section, SectionWriter, image_row
from guard.report.source import AuditFolder
from guard.report.text import label, num, pct

__all__ = ["build"]


def build(src: AuditFolder) -> Section | None:
    m = src.section("model")
    if not isinstance(m, dict):
        return None
    w = SectionWriter(src, "model", "Model and data")
    data = m.get("data") if isinstance(m.get("data"), dict) else {}
    rows = [
        ("model", m.get("name", "n/a")),
        ("classes", num(m.get("num_classes"))),
        ("parameters", num(m.get("parameters"))),
        ("clean accuracy (held-out)", f"{pct(m.get('clean_accuracy'))} of {num(data.get('test'))} images"),
        ("training accuracy", f"{pct(m.get('train_accuracy'))} of {num(data.get('train'))} images"),
        ("data", data.get("source", "n/a")),
    ]
    defaults = src.section("defaults")
    if isinstance(defaults, dict):
        kind = defaults.get("kind")
        eps = defaults.get("eps")
        rows.append(("attack budget (derived from the data)", f"{kind or 'n/a'} images: L-inf eps {num(eps)}"))
    w.add(table(None, rows))
    w.add(w.cmd(["model", "defaults"]))
    ex = w.artifact("examples", "the held-out example images", needs=("x",))
    if ex is not None:
        x = ex["x"]
        y = ex.get("y")
        pred = ex.get("pred")
        caps, bad = [], []
        for i in range(x.shape[0]):
            t = label(y[i], w.names) if y is not None else "?"
            if pred is not None:
                caps.append(f"{t} / {label(pred[i], w.names)}")
                bad.append(y is not None and int(pred[i]) != int(y[i]))
            else:
                caps.append(t)
        shape = "x".join(str(s) for s in x.shape[1:])
        w.add(
            figure(
                tile_rows([image_row("held-out", x, caps, bad)]),
                f"The first {x.shape[0]} held-out images ({shape}), captioned true label / the model's label; a red "
                "caption is a mistake on the clean image. The attack sections start from these same images.",
                w.cmd(["model"], ["examples"]),
            )
        )
    return w.done()
