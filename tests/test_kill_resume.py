"""Crash safety: an audit killed with SIGKILL at random points always resumes to a valid report.

A small audit (:mod:`audit_driver`) runs in a process of its own (forked from a forkserver that
imported guard once); the parent reads the runner's
"audit: STEP" lines and kills the child at a random delay (fixed seed) after a step starts, up
to 1.2x that step's uninterrupted duration, so kills land inside the steps and on the writes
at their ends (half of the kills each). Each step is killed :data:`KILLS_PER_STEP` times, then let
through; a new campaign starts while a step's quota is not used up (a kill drawn past the
audit's end). Two kills per step and 20 in all, before, cost about 320 s of the CI's 21 minutes;
one per step keeps every step's resume checked at about half that. After
every kill: every .json file parses, every .safetensors file loads (the guarded folder through
its integrity checks); a killed write may leave a ``.tmp`` behind, which the next run sweeps.
At the end ``--resume`` finishes with exit code 0, a report equal in keys to an uninterrupted
run, and no ``.tmp`` left anywhere. The figures are written to ``kill_resume_figures.json``
in the test's folder and printed with ``-s``.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

import audit_driver
import pytest

import guard
from guard.core.cache import TMP_SUFFIX, load_tensors
from guard.detectors.base import Persistent

KILLS_PER_STEP = 1
SEED = 13


_FORK = multiprocessing.get_context("forkserver")  # each run forks from a process that imported guard once
_FORK.set_forkserver_preload(["guard", "guard.audit", "guard.report", "audit_driver"])


class _Run:
    """One audit process (:func:`audit_driver.run`) and the lines of its log, read as they are written."""

    def __init__(self, out: Path, resume: bool) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
        self.log.touch()
        self.proc = _FORK.Process(target=audit_driver.run, args=(str(out), resume, str(self.log)))
        self.proc.start()
        self._file = self.log.open()
        self._partial = ""

    def poll(self) -> int | None:
        return None if self.proc.is_alive() else self.proc.exitcode

    def lines(self) -> list[tuple[float, str]]:
        """The complete lines written since the last call, with the time they were read."""
        text = self._partial + self._file.read()
        *done, self._partial = text.split("\n")
        now = time.monotonic()
        return [(now, line) for line in done]

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.join()
        self._file.close()

    def wait(self, timeout: float) -> int | None:
        self.proc.join(timeout)
        self._file.close()
        return self.proc.exitcode


def _step_started(line: str) -> str | None:
    """The step a runner log line says is starting ("INFO guard.audit.runner: audit: detectors")."""
    marker = "guard.audit.runner: audit: "
    if marker not in line:
        return None
    rest = line.split(marker, 1)[1]
    return None if " " in rest else rest


def _check_files(out: Path) -> dict[str, int]:
    """Every finished file is whole: .json parses, .safetensors loads (guarded members with their seals)."""
    counts = {"json": 0, "safetensors": 0, "tmp": 0}
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        if p.name.endswith(TMP_SUFFIX):
            counts["tmp"] += 1
        elif p.suffix == ".json":
            json.loads(p.read_text())
            counts["json"] += 1
        elif p.suffix == ".safetensors":
            if p.parent.name == "guarded":
                Persistent.load(
                    p,
                    expected_sha256=(
                        p.with_name(p.name + ".sha256").read_text().split()[0]
                        if p.with_name(p.name + ".sha256").is_file()
                        else None
                    ),
                )
            else:
                load_tensors(p)
            counts["safetensors"] += 1
    return counts


def _keys(report: dict, depth: int = 2) -> dict:
    return {k: (_keys(v, depth - 1) if isinstance(v, dict) and depth > 1 else None) for k, v in report.items()}


def _campaign(out: Path, rng: random.Random, durations: dict, per_step: dict, kills: list) -> int:
    """Kill-and-resume one audit in ``out`` until a run finishes unkilled; returns the number of runs.

    A step whose quota (``per_step``) is not used up gets a kill drawn at its start; the kill
    counts against that step's quota, and is recorded with the step it landed in.
    """
    runs, resume = 0, False
    while True:
        run = _Run(out, resume)
        runs, resume = runs + 1, True
        current, deadline, killed = None, None, False
        while run.poll() is None:
            time.sleep(0.02)
            for when, line in run.lines():
                step = _step_started(line)
                if step is None:
                    continue
                current = step
                if deadline is None and per_step.get(step, KILLS_PER_STEP) < KILLS_PER_STEP:
                    d = max(0.5, float(durations[step]))
                    # half the kills anywhere in the step, half around its end, where it writes its files
                    delay = rng.uniform(0.0, 1.2 * d) if rng.random() < 0.5 else rng.uniform(0.85 * d, 1.15 * d)
                    deadline = (when, delay, step)
            if deadline is not None and time.monotonic() >= deadline[0] + deadline[1] and run.poll() is None:
                run.kill()
                per_step[deadline[2]] += 1  # the quota of the step the delay was drawn for
                files = _check_files(out)
                kills.append(
                    {
                        "run": runs,
                        "after_start_of": deadline[2],
                        "landed_in": current,
                        "delay_s": round(deadline[1], 2),
                        "tmp_left": files["tmp"],
                    }
                )
                killed = True
                break
        if not killed:
            assert run.wait(timeout=600) == 0, f"a resumed audit failed: {run.log.read_text()[-2000:]}"
            return runs
        assert runs < 60


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path) -> None:
    guard.demo_model(progress=False)  # the demo model is cached before the clock starts
    ref_out = tmp_path / "reference"
    ref = _Run(ref_out, resume=False)
    assert ref.wait(timeout=600) == 0, ref.log.read_text()[-2000:]
    reference = json.loads((ref_out / "report.json").read_text())
    durations = reference["timings"]
    steps = reference["_completed_steps"]

    rng = random.Random(SEED)
    kills: list[dict] = []
    per_step = {s: 0 for s in steps}
    runs, campaigns, t0 = 0, 0, time.monotonic()
    while min(per_step.values()) < KILLS_PER_STEP:
        campaigns += 1
        out = tmp_path / f"killed{campaigns}"
        runs += _campaign(out, rng, durations, per_step, kills)
        final = json.loads((out / "report.json").read_text())
        files = _check_files(out)
        assert files["tmp"] == 0  # the resumed run swept what the killed writers left
        assert final["_completed_steps"] == steps and "errors" not in final
        assert _keys(final) == _keys(reference)
        assert campaigns < 5
    landed = {s: sum(1 for k in kills if k["landed_in"] == s) for s in steps}
    figures = {
        "kills": len(kills),
        "runs": runs,
        "resumes": runs - campaigns,
        "campaigns": campaigns,
        "kills_landed_in": landed,
        "kills_that_left_a_tmp": sum(1 for k in kills if k["tmp_left"]),
        "all_valid": True,
        "seconds": round(time.monotonic() - t0, 1),
        "kill_log": kills,
    }
    (tmp_path / "kill_resume_figures.json").write_text(json.dumps(figures, indent=2))
    sys.stdout.write(json.dumps({k: v for k, v in figures.items() if k != "kill_log"}) + "\n")
