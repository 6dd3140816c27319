"""Run engines for the FlexTensor tests: the shared harness's runner, plus FlexTensor's plan
and counters read through ``llm.collective_rpc`` after generating.

``python -m tests.flextensor.engines SPEC.json OUT.json``; :func:`run_engines_in_turn` runs
specs one after another, each in its own process (a 2-core CI machine runs one at a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness.equality import REPO


def run_engines_in_turn(specs: dict[str, dict], timeout: float = 900) -> dict[str, dict]:
    """Each spec in its own process, in order; results by name (with ``log_path``)."""
    workdir = Path(tempfile.mkdtemp(prefix="vllm-flextensor-eq-"))
    results = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    for name, spec in specs.items():
        spec_path, out_path, log_path = (workdir / f"{name}.{x}" for x in ("spec.json", "out.json",
                                                                             "log"))
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run([sys.executable, "-m", "tests.flextensor.engines",
                                     str(spec_path), str(out_path)], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            raise RuntimeError(f"[{name}] engine process ended with {rc}; last log lines:\n"
                               f"{log_path.read_text()[-6000:]}")
        results[name] = json.loads(out_path.read_text())
        results[name]["log_path"] = str(log_path)
    return results


def main() -> None:
    from tests.harness import run_engine

    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    stats = {}
    if spec.get("additional_config", {}).get("flextensor", {}).get("enabled"):
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # rpc with a function
        from vllm import LLM

        from vllm_flextensor.moe_layer import worker_stats

        generate = LLM.generate

        def generate_then_read_stats(self, *args, **kwargs):
            out = generate(self, *args, **kwargs)
            stats["after"] = self.collective_rpc(worker_stats)[0]
            return out

        LLM.generate = generate_then_read_stats
    result = run_engine.run(spec)
    result["flextensor_stats"] = stats.get("after")
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
