"""How far block-FP8 MoE engines land from each other and from the bf16 truth (one GPU).

Runs, side by side on one tiny random Qwen3-MoE with block-FP8 experts, the greedy
PROMPTS of the equality tests through:

- ``stock``: stock vLLM (UE8M0 activation scales, its default on Hopper);
- ``stock_e8m0_off``: stock vLLM with ``VLLM_USE_DEEP_GEMM_E8M0=0`` (float activation
  scales): stock against itself, what one rounding choice moves;
- ``dwdp_1rank``: DWDP with one rank holding every expert (our kernel, nothing pulled);
- ``dwdp_rank0`` / ``dwdp_rank1``: two DWDP ranks on the one GPU (half the experts pulled);
- ``flextensor``: FlexTensor with 3 of 8 experts a layer cached, the rest streamed;
- ``bf16_truth``: stock vLLM on the same checkpoint dequantised to bf16 (the weights the FP8
  engines approximate; their only other error is activation quantisation).

Prints and writes (``--out``) for every pair: per prompt, where greedy tokens first differ
and the largest chosen-token logprob difference before that. Engine logs and outputs stay
in the work directory printed first.

    python benchmarks/fp8_engine_numerics.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compare(a: dict, b: dict) -> list[dict]:
    rows = []
    for i, (ra, rb) in enumerate(zip(a["outputs"], b["outputs"])):
        first_diff, worst = None, 0.0
        for pos, (la, lb) in enumerate(zip(ra["logprobs"], rb["logprobs"])):
            ta, tb = str(ra["token_ids"][pos]), str(rb["token_ids"][pos])
            if ta != tb:
                first_diff = pos
                break
            worst = max(worst, abs(la[ta] - lb[ta]))
        rows.append({"prompt": i, "first_token_difference": first_diff,
                     "max_logprob_diff_before": round(worst, 4)})
    return rows


def main() -> None:
    from tests.dwdp.test_dwdp_cpu import stay_until_all_done
    from tests.flextensor.test_flextensor_cpu import flex_spec, weights_of
    from tests.harness.checkpoints import build_qwen3_moe_fp8, dequantise_block_fp8
    from tests.harness.equality import PROMPTS, run_engines
    from vllm_flextensor.planner import budget_for_cache_slots

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fp8_engine_numerics.json")
    ap.add_argument("--timeout", type=float, default=400)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-dwdp-eq-fp8num-"))
    print("work directory:", work, flush=True)
    model = build_qwen3_moe_fp8(work / "fp8")
    truth = dequantise_block_fp8(model, work / "bf16")
    base = dict(prompts=PROMPTS, max_tokens=8, logprobs=5, device="cuda", dtype="bfloat16",
                engine_kwargs={"kv_cache_memory_bytes": 1 << 28})
    port = 29700 + os.getpid() % 100
    specs = {
        "stock": dict(base, model=str(model), env={"VLLM_PLUGINS": ""}),
        "stock_e8m0_off": dict(base, model=str(model),
                               env={"VLLM_PLUGINS": "", "VLLM_USE_DEEP_GEMM_E8M0": "0"}),
        "bf16_truth": dict(base, model=str(truth), env={"VLLM_PLUGINS": ""}),
        "dwdp_1rank": dict(base, model=str(model), additional_config={
            "dwdp": {"enabled": True, "world_size": 1}}),
        "flextensor": dict(flex_spec(str(model), budget_for_cache_slots(
            weights_of(str(model), dtype_bytes=2), 3)), **{
            k: v for k, v in base.items() if k != "prompts"}),
    }
    for r in (0, 1):
        specs[f"dwdp_rank{r}"] = dict(
            base, model=str(model), **stay_until_all_done(work, r, 2),
            env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
            additional_config={"dwdp": {"enabled": True, "world_size": 2, "rank": r,
                                        "group": f"fp8num{port}"}})
    results = run_engines(specs, timeout=args.timeout)
    report = {"engines": {n: {"token_ids": [o["token_ids"] for o in r["outputs"]]}
                          for n, r in results.items()}, "pairs": {}}
    for a, b in itertools.combinations(sorted(results), 2):
        report["pairs"][f"{a} vs {b}"] = compare(results[a], results[b])
    for pair, rows in report["pairs"].items():
        print(f"{pair:34s}", "  ".join(
            f"p{r['prompt']}: diff@{r['first_token_difference']} max|dlp| "
            f"{r['max_logprob_diff_before']:.3f}" for r in rows))
    report["command"] = "python benchmarks/fp8_engine_numerics.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
