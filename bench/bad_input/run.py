"""The bad-input suite, counted: every class of bad input tried through the real `shardex` console
script, as a user would meet it, and each outcome judged the same way.

- refused: a non-zero exit, exactly one error line (no traceback) naming the file, row, field,
  option or shard it is about, and nothing lost: the index root it ran against (a copy of one good
  published build) keeps the same CURRENT, the same versions, and every file of them still
  matches its manifest's sha256.
- quarantined: exit 0 with --bad-rows skip; every input row is either indexed or in the
  quarantine file (indexed + rejected == rows in), and the rejected count is the one expected.
- warned: exit 0 and a warning line naming the problem.

Data lost counts any class where rows or published versions went missing. Prints the table,
writes bench/results/bad_input.json.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/bad_input/run.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES, Case, vectors_corpus  # noqa: E402  (this folder is on sys.path now)

from shards.storage.lease import hold  # noqa: E402
from shards.storage.store import Store  # noqa: E402

RESULTS = HERE.parent / "results"
SHARDEX = str(Path(sys.executable).with_name("shardex"))
PREFIX = "shardex: error: "


def run(args: list[str], cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([SHARDEX, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def one_error_line(stderr: str) -> str | None:
    """The error line when stderr holds exactly one and otherwise only progress logs, else None.
    argparse's own refusals (a usage block, then `shardex CMD: error: ...`) count as one line too."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if lines and lines[0].startswith("usage: shardex"):
        lines = [ln for ln in lines if not ln.startswith(("usage: ", " "))]
    errors = [ln for ln in lines if ln.startswith(PREFIX) or re.match(r"shardex \w+: error: ", ln)]
    stray = [ln for ln in lines if ln not in errors and not ln.startswith("[shardex ")]
    return errors[0] if len(errors) == 1 and not stray and "Traceback" not in stderr else None


def snapshot(root: Path) -> dict:
    """What a reader of the root sees: CURRENT, the published versions, and whether they verify."""
    from shards.storage.manifest import list_versions, load_manifest, verify
    from shards.storage.store import Store

    store = Store(str(root))
    vs = sorted(v["version"] for v in list_versions(store))
    ok = True
    for v in vs:
        try:
            verify(store, load_manifest(store, v))
        except Exception:  # noqa: BLE001  (any failure is a damaged version)
            ok = False
    cur = (root / "CURRENT").read_text().strip() if (root / "CURRENT").exists() else None
    return {"current": cur, "versions": vs, "verified": ok}


def judge(c: Case, p: subprocess.CompletedProcess, before: dict, after: dict, d: Path) -> dict:
    out = {"case": c.name, "group": c.group, "expect": c.outcome, "rc": p.returncode}
    if c.outcome == "refused":
        line = one_error_line(p.stderr) if p.returncode != 0 else None
        named = line is not None and all(s.format(d=d) in line for s in c.names)
        lost = after["current"] != before["current"] or after["versions"] != before["versions"] \
            or (before["verified"] and not after["verified"])
        out.update(ok=named, line=line or p.stderr.strip().splitlines()[-1:], lost=lost)
    elif c.outcome == "quarantined":
        s = json.loads(p.stdout) if p.returncode == 0 else {}
        got = (s.get("documents", 0), s.get("rejected", 0))
        out.update(ok=got == (c.rows - c.rejected, c.rejected), got=got, lost=sum(got) != c.rows)
    else:  # warned
        text = p.stdout + p.stderr
        out.update(ok=p.returncode == 0 and all(s in text for s in c.names),
                   line=next((ln for ln in text.splitlines() if "warning" in ln.lower()), None), lost=False)
    return out


def seed(base: Path) -> Path:
    """A good index root with two published versions (a rollback needs an older one): every case
    runs against a copy of it."""
    root = base / "seed-root"
    for n in (2000, 2100):
        src = vectors_corpus(base / f"good-{n}", n, 16)
        p = run(["build", str(src), str(root), "--vector-column", "vector", "--factory", "IVF16,Flat",
                 "--shards", "2"], cwd=str(base))
        if p.returncode != 0:
            sys.exit(f"the seed build failed:\n{p.stderr}")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only the cases whose name contains this")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="shardex-bad-"))
    seeded = seed(base)
    rows = []
    for c in (c for c in CASES if a.k in c.name):
        d = base / c.name
        d.mkdir()
        root = d / "root"
        shutil.copytree(seeded, root)
        args = c.make(d, root)
        before = snapshot(root)
        t = time.perf_counter()
        with hold(Store(str(root)), "bad-input bench") if c.held else nullcontext():
            p = run(args, cwd=str(d))
        r = judge(c, p, before, snapshot(root), d)
        r["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        print(f"{'ok ' if r['ok'] else 'BAD'} {c.group:10} {c.name:34} {c.outcome:11} {r['seconds']:6.1f}s  "
              f"{r.get('line') or r.get('got')}", flush=True)
    total = {"classes": len(rows), "as_expected": sum(r["ok"] for r in rows),
             "refused_clearly": sum(r["ok"] for r in rows if r["expect"] == "refused"),
             "refusals": sum(r["expect"] == "refused" for r in rows),
             "quarantined": sum(r["ok"] for r in rows if r["expect"] == "quarantined"),
             "warned": sum(r["ok"] for r in rows if r["expect"] == "warned"),
             "data_lost": sum(bool(r["lost"]) for r in rows)}
    print(json.dumps(total))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bad_input.json").write_text(json.dumps({"total": total, "cases": rows}, indent=1, default=str))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
