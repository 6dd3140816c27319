"""Run one real vLLM engine in this process and write its greedy outputs as JSON.

Used by the equality tests: the stock engine and the plugin engine(s) each run in their own
process (``python -m tests.harness.run_engine SPEC.json OUT.json``), so no state leaks
between them and several DWDP ranks can run side by side.

SPEC keys: model, prompts (lists of token ids), max_tokens, logprobs (top-k to record),
additional_config, dtype, enforce_eager, env (variables set before vLLM is imported),
device ("cpu" or "cuda"), text (load the model's tokenizer and return text too),
prompt_logprobs (also record each prompt token's logprob given the tokens before it:
engines compared token by token on the same inputs, whatever they would generate). For DWDP scenarios: ``dwdp_stats`` (record per-layer DWDP counters
before and after generating), ``wait_for`` (a file whose appearance ends the run, for a rank
that stays idle while a peer works), ``done_file`` (touched after generating), and
``linger_s`` (keep serving one small request a second, to see how the engine reacts to a
peer's death), ``loop_s`` (keep generating the prompts back to back, printing "generating"
first: an engine in the middle of requests when a peer dies). ``moe_graph_splits``: a stock
engine whose piecewise CUDA graphs are split at the MoE layer calls as DWDP's ``cuda_graphs``
setting splits them (``vllm_compat.run_moe_between_graph_pieces`` on the built config, no
plugin loaded), so both run the same compiled pieces.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run(spec: dict) -> dict:
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    engine_kwargs = dict(spec.get("engine_kwargs", {}))
    if spec.get("device", "cpu") == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        # Several engines share one GPU in the equality tests.
        engine_kwargs.setdefault("gpu_memory_utilization", 0.3)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if spec.get("moe_graph_splits"):
        from vllm_moe_core import vllm_compat

        vllm_compat.add_config_validator(
            "moe_graph_splits", lambda engine_args: vllm_compat.run_moe_between_graph_pieces)

    t0 = time.monotonic()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=not spec.get("text", False),
        dtype=spec.get("dtype", "float32"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 256),
        max_num_seqs=spec.get("max_num_seqs", 8),
        seed=0,
        additional_config=spec.get("additional_config") or {},
        **engine_kwargs,
    )
    startup_s = time.monotonic() - t0
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec.get("max_tokens", 8),
        logprobs=spec.get("logprobs", 5),
        detokenize=spec.get("text", False),
        ignore_eos=True,
        prompt_logprobs=1 if spec.get("prompt_logprobs") else None,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    stats_before = _dwdp_stats(llm) if spec.get("dwdp_stats") else None
    outs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
    if spec.get("done_file"):
        open(spec["done_file"], "w").close()
    waits = spec.get("wait_for") or []
    for path in [waits] if isinstance(waits, str) else waits:
        deadline = time.monotonic() + spec.get("wait_timeout_s", 300)
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear")
            time.sleep(0.2)
    if spec.get("loop_s"):
        print("generating", flush=True)
        loop_until = time.monotonic() + spec["loop_s"]
        while time.monotonic() < loop_until:
            llm.generate(prompts, params, use_tqdm=False)
    linger_until = time.monotonic() + spec.get("linger_s", 0)
    while time.monotonic() < linger_until:
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                     SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        time.sleep(1.0)
    results = []
    for out in outs:
        comp = out.outputs[0]
        result = {
            "text": comp.text,
            "token_ids": list(comp.token_ids),
            # one {token_id: logprob} dict per generated position
            "logprobs": [
                {str(t): lp.logprob for t, lp in pos.items()} for pos in (comp.logprobs or [])
            ],
        }
        if spec.get("prompt_logprobs"):  # position 0 has none: nothing comes before it
            result["prompt_logprobs"] = [pos[tok].logprob for tok, pos in
                                         zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        results.append(result)
    import vllm

    out = {"vllm_version": vllm.__version__, "startup_s": startup_s, "outputs": results}
    if stats_before is not None:
        out["dwdp_stats_before"], out["dwdp_stats_after"] = stats_before, _dwdp_stats(llm)
    return out


def _dwdp_stats(llm):
    from vllm_dwdp.moe_layer import worker_stats

    return llm.collective_rpc(worker_stats)[0]


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
