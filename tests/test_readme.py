"""The README's code blocks run as written: shell blocks in bash, Python blocks in python, YAML
blocks through the config model they are for. A block that cannot run here says why in the
comment line before it, `<!-- not run in tests: REASON -->`; any other block fails the test.

The blocks run in README order in one scratch directory, where a small demo corpus stands in
for the one `make demo` writes (data/demo/corpus/, and corpus/ for the Python example). Two
things are adapted, no more: `shardex serve` runs in the background until its "serving" line,
for the commands after it (a user runs curl in another shell), and port 8000 becomes a free one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port
from rayhead import env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = re.compile(r"^<!-- not run in tests: (.+) -->$")
SHELL = ("", "bash", "sh")
MODELS = {"build.yaml": "BuildConfig", "reindex.yaml": "ReindexConfig", "eval.yaml": "EvalConfig",
          "serve.yaml": "ServeConfig"}
DOCS = 200          # documents in the stand-in corpus: enough for every stage, quick to encode


def blocks(text: str) -> list[dict]:
    """Each fenced block: its line, language, text, and the reason it is not run (None: it runs)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        mark = MARK.match(before)
        out.append({"line": i + 1, "lang": m.group(1), "text": "\n".join(lines[i + 1:j]) + "\n",
                    "skip": mark.group(1) if mark else None})
        i = j + 1
    return out


def runnable(b: dict) -> bool:
    return b["lang"] in (*SHELL, "python") or (b["lang"] == "yaml" and _yaml_name(b) in MODELS)


def _yaml_name(b: dict) -> str | None:
    m = re.match(r"#\s*(\S+\.yaml)", b["text"])
    return m.group(1) if m else None


def test_every_block_runs_or_says_why_not():
    bs = blocks(README.read_text())
    assert len(bs) >= 10
    odd = [f"README.md:{b['line']}: ```{b['lang']}" for b in bs if not b["skip"] and not runnable(b)]
    assert not odd, f"blocks neither runnable here nor marked '<!-- not run in tests: why -->': {odd}"
    assert sum(1 for b in bs if not b["skip"] and b["lang"] in SHELL) >= 2


def as_script(text: str, port: int) -> str:
    """The block as a bash script: `shardex serve` in the background until it serves, stopped at the end."""
    lines = ["set -euo pipefail", "SERVE=", "trap '[ -z \"$SERVE\" ] || { kill -TERM $SERVE; wait $SERVE; }' EXIT"]
    for ln in text.replace("8000", str(port)).splitlines():
        if ln.startswith("shardex serve "):
            cmd = re.sub(r"\s+#.*$", "", ln)
            lines += [f"{cmd} > serve.log 2>&1 & SERVE=$!",
                      "until grep -q '^serving ' serve.log; do",
                      "  kill -0 $SERVE 2>/dev/null || { SERVE=; cat serve.log >&2; exit 1; }; sleep 1",
                      "done"]
        else:
            lines.append(ln)
    return "\n".join(lines) + "\n"


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """argv in a session of its own; whatever it leaves behind is killed with it."""
    e = env(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen(argv, cwd=cwd, env=e, start_new_session=True, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def check_json(where: str, stdout: str) -> int:
    """Every JSON object printed (search --json, curl) is an answer, not an error; their count."""
    n = 0
    for ln in stdout.splitlines():
        if not ln.startswith("{"):
            continue
        got = json.loads(ln)
        assert "error" not in got, f"{where}: {ln[:500]}"
        if "results" in got:
            assert got["results"] and all(got["results"]), f"{where}: empty results: {ln[:500]}"
        n += 1
    return n


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path):
    from index_builder.demo.textcorpus import write_corpus

    for corpus in ("data/demo/corpus", "corpus"):
        write_corpus(str(tmp_path / corpus), limit=DOCS)
    ran = {"shell": 0, "python": 0, "yaml": 0, "json": 0}
    for b in blocks(README.read_text()):
        if b["skip"]:
            continue
        where = f"README.md:{b['line']}"
        if b["lang"] == "yaml":
            from index_builder.cli import config_model

            f = tmp_path / _yaml_name(b)
            f.write_text(b["text"])
            config_model(MODELS[f.name]).from_yaml(str(f))       # a ConfigError names the key at fault
            ran["yaml"] += 1
            continue
        if b["lang"] == "python":
            r = run([sys.executable, "-c", b["text"]], tmp_path)
            ran["python"] += 1
        else:
            r = run(["bash", "-c", as_script(b["text"], free_port())], tmp_path)
            ran["shell"] += 1
        assert r.returncode == 0, f"{where} exited {r.returncode}:\n{b['text']}\n{r.stderr[-4000:]}"
        ran["json"] += check_json(where, r.stdout)
    assert ran["shell"] >= 2 and ran["python"] >= 1 and ran["yaml"] >= 2 and ran["json"] >= 2, ran
