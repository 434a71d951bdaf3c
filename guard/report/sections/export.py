"""Section "Export": the ONNX graph, PyTorch-vs-onnxruntime parity and latency."""

from __future__ import annotations

from pathlib import Path

from guard.report.html import esc, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.source import AuditFolder
from guard.report.text import num

__all__ = ["build"]


def build(src: AuditFolder) -> Section | None:
    e = src.section("export")
    if not isinstance(e, dict):
        return None
    w = SectionWriter(src, "export", "Export")
    size = e.get("file_bytes")
    w.add(
        table(
            None,
            [
                ("file", Path(str(e.get("path", "model.onnx"))).name),
                ("exported", e.get("source", "n/a")),
                ("opset", num(e.get("opset"))),
                ("size", f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "n/a"),
                ("outputs", ", ".join(map(str, e.get("outputs") or []))),
                ("providers", ", ".join(map(str, e.get("providers") or []))),
                ("flags identical on every set", num(e.get("flags_identical"))),
                ("... except calibration-borderline images", num(e.get("flags_identical_except_borderline"))),
            ],
        ),
        w.cmd(["export"]),
    )
    parity = e.get("parity") if isinstance(e.get("parity"), dict) else {}
    if parity:
        sizes = ", ".join(map(str, e.get("parity_batch_sizes") or []))
        w.add(
            f"<h3>Parity</h3><p>The graph in onnxruntime against the model in PyTorch on held-out images (batch sizes {esc(sizes)}): "
            "the largest absolute and relative difference of each output, the label agreement, the flags that differ.</p>",
            table(
                ["output", "max abs", "max rel", "agreement", "differing", "passed"],
                [
                    [
                        k,
                        num(v.get("max_abs")),
                        num(v.get("max_rel")),
                        num(v.get("agreement")),
                        num(v.get("n_diff")),
                        (num(v.get("passed")), "" if v.get("passed") else "background:#f6d5d3"),
                    ]
                    for k, v in parity.items()
                    if isinstance(v, dict)
                ],
            ),
            w.cmd(["export.parity"]),
        )
    full = e.get("parity_full") if isinstance(e.get("parity_full"), dict) else {}
    if full:
        rows = []
        for name, figs in full.items():
            if not isinstance(figs, dict):
                continue
            bad = [k for k, v in figs.items() if isinstance(v, dict) and v.get("passed") is False]
            border = sum(int(v.get("borderline", 0) or 0) for v in figs.values() if isinstance(v, dict))
            rows.append([name, num(len(figs)), ", ".join(bad) or "none", num(border)])
        w.add(
            "<p>The same on every image set (clean and each attack's images):</p>",
            table(["image set", "outputs compared", "out of tolerance", "borderline flags"], rows),
            w.cmd(["export.parity_full"]),
        )
    lat = e.get("latency_ms") if isinstance(e.get("latency_ms"), dict) else {}
    rows = [
        [
            k.replace("batch_", "batch "),
            num(v.get("onnxruntime_cpu_ms")),
            num(v.get("pytorch_eager_ms")),
            num(v.get("ratio")),
        ]
        for k, v in lat.items()
        if isinstance(v, dict)
    ]
    if rows:
        w.add(
            f"<h3>Latency</h3><p>Median milliseconds per call on {esc(num(lat.get('threads')))} CPU thread(s), model and detectors "
            "together (ratio below 1: onnxruntime is faster).</p>",
            table(["batch", "onnxruntime CPU ms", "PyTorch eager ms", "ratio"], rows),
            w.cmd(["export.latency_ms"]),
        )
    return w.done()
