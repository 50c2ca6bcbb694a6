"""`curate serve MODEL --pooling`: a real vLLM pooling server of the tiny model started by the verb, the
`--endpoint` line it prints, scoring through that line equal to the in-process transformers reference, and a
clean stop on Ctrl-C (SIGINT) that takes the server down with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from curate.store.sql import connect
from curate.store.workspace import Workspace

pytestmark = pytest.mark.slow
SUBSET = "example_id < '01'"  # 8 GSM8K problems


def test_serve_prints_the_endpoint_line_scores_through_it_and_stops_on_ctrl_c(tiny_model_dir: Path, fresh: Workspace) -> None:
    pytest.importorskip("vllm")
    import httpx

    from curate.models.scorer import open_scorer
    from curate.stages.score import score

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "curate.cli", "serve", str(tiny_model_dir), "--pooling", "--port", "0",
                              "--served-model", "tiny", "--dtype", "float32", "--max-model-len", "1024", "--wait", "1500"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    printed: list[str] = []
    try:
        while not any(line.startswith("Ctrl-C stops it") for line in printed):  # the last line it prints once up
            line = serve.stdout.readline()
            assert line, "curate serve exited before the server was up:\n" + "".join(printed)
            printed.append(line)
        use = next(line.split("#")[0].split() for line in printed if "--endpoint" in line)
        assert use[:2] == ["curate", "score"] and use[use.index("--served-model") + 1] == "tiny"
        url = use[use.index("--endpoint") + 1]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200

        # the printed line, with the workspace filled in, is the command that scores through the server
        command = [a if a != "WORKSPACE" else str(fresh.root) for a in use[2:]]
        done = subprocess.run([sys.executable, "-m", "curate.cli", "score", *command, "--where", SUBSET],
                              capture_output=True, text=True, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = serve.communicate(timeout=90)
    assert serve.returncode == 0, "".join(printed) + rest
    assert "stopped the server" in rest
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=5)  # nothing left listening

    served = connect(fresh).execute("select example_id, signals, logprob, entropy from token_scores order by example_id").fetchall()
    assert len(served) == connect(fresh).execute(f"select count(*) from examples where {SUBSET}").fetchall()[0][0] > 0
    reference = open_scorer(str(tiny_model_dir), engine="transformers", dtype="float32", top_k=5)
    try:
        score(fresh, reference, where=SUBSET, progress=False)
    finally:
        reference.close()
    rows = connect(fresh).execute("select example_id, logprob, entropy from token_scores where score_key = ? order by example_id",
                                  [reference.key]).fetchall()
    assert [r[0] for r in rows] == [r[0] for r in served]
    for (example, signals, logprob, entropy), (_, ref_logprob, ref_entropy) in zip(served, rows):
        assert signals == "exact" and logprob[0] is None
        for ours, theirs in ((logprob, ref_logprob), (entropy, ref_entropy)):  # vLLM's hidden states vs transformers', same head
            assert np.max(np.abs(np.array(ours[1:], dtype=float) - np.array(theirs[1:], dtype=float))) < 1e-3, example
