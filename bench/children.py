"""Each benchmark path runs in a fresh process, so its peak RSS is its own and no path warms another's caches."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any


def run_child(script: str, arguments: list[str], *, label: str) -> dict[str, Any] | None:
    """Run ``script --child ARGUMENTS``; its last line of output is a JSON object. None (and the error) if it fails."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, script, "--child", *arguments], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{label} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux: VmHWM, which starts afresh at exec; ru_maxrss would carry
    over the high-water mark of the parent that forked it), or of the processes it waited for if higher."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as status:
            own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(own, children)
