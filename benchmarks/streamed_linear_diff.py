"""Where does a dense-streaming engine first differ from stock vLLM? (one GPU)

Runs stock vLLM and FlexTensor with every decoder layer's linears streamed (the GPU test
``test_streamed_dense_layers_match_stock_on_cuda[qwen3_fp8...]``'s model and budget), each
in its own process with vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and reports:

- per decoder linear, every tensor the layer holds after vLLM's post-load step (streamed:
  what its host home holds), against stock's: shape, strides, dtype, bytes equal;
- per decoder linear, in forward order, the input and output of its first call (the
  prefill of the prompts) against stock's: the first linear whose output differs while its
  input does not is where streaming changes the computation;
- the first token's logprobs.

With ``--no-deep-gemm`` both engines also run with ``VLLM_USE_DEEP_GEMM=0``.

    python benchmarks/streamed_linear_diff.py --out streamed_linear_diff.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LINEAR = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.\w+_proj$")


def child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=256,
              max_num_seqs=8, seed=0, skip_tokenizer_init=True, gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=1 << 28, additional_config=spec.get("additional_config") or {})
    captured: dict = {}

    def describe(t):
        return dict(shape=list(t.shape), stride=list(t.stride()), dtype=str(t.dtype),
                    device=str(t.device))

    def dump(model):
        out = {}
        for name, mod in model.named_modules():
            if not LINEAR.search(name):
                continue
            qm = mod.quant_method
            inner = getattr(qm, "inner", qm)
            d = {"quant_method": type(qm).__name__, "inner": type(inner).__name__,
                 "kernel": type(getattr(inner, "fp8_linear", None)).__name__, "tensors": {}}
            for pn, p in mod.named_parameters(recurse=False):
                d["tensors"][pn] = (describe(p.data), p.data.detach().cpu().clone())
            for an, v in list(vars(mod).items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    d["tensors"]["attr:" + an] = (describe(v), v.detach().cpu().clone())
            out[name] = d

            def hook(m, inp, o, name=name):
                if name not in captured:
                    o = o[0] if isinstance(o, tuple) else o
                    captured[name] = (len(captured), inp[0].detach().cpu().clone(),
                                      o.detach().cpu().clone())
            mod.register_forward_hook(hook)
        return out

    weights = llm.apply_model(dump)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                        use_tqdm=False)
    logprobs = [{int(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
    torch.save({"weights": weights, "captured": captured, "logprobs": logprobs}, out_path)


def compare(a: dict, b: dict) -> dict:
    import torch

    weights = {}
    for name, da in a["weights"].items():
        db = b["weights"].get(name)
        if db is None:
            weights[name] = "missing"
            continue
        row = {"stock": [da["quant_method"], da["kernel"]], "other": [db["quant_method"],
                                                                     db["inner"], db["kernel"]]}
        for tn, (desc, ta) in da["tensors"].items():
            if tn == "bias":
                continue
            got = db["tensors"].get(tn)
            if got is None:
                row[tn] = {"missing": True, "stock": desc}
                continue
            desc_b, tb = got
            same = (ta.shape == tb.shape and ta.dtype == tb.dtype
                    and torch.equal(ta.view(torch.uint8) if ta.dtype.itemsize == 1 else ta, 
                                    tb.view(torch.uint8) if tb.dtype.itemsize == 1 else tb))
            r = {"equal": bool(same)}
            if not same:
                r.update(stock=desc, other=desc_b)
                if ta.shape == tb.shape:
                    r["max_abs_diff"] = float((ta.float() - tb.float()).abs().max())
                    r["differing"] = int((ta.float() != tb.float()).sum())
            row[tn] = r
        extra = sorted(set(db["tensors"]) - set(da["tensors"]))
        if extra:
            row["only_other"] = extra
        weights[name] = row
    calls = []
    for name, (i, xa, ya) in sorted(a["captured"].items(), key=lambda kv: kv[1][0]):
        got = b["captured"].get(name)
        if got is None:
            calls.append({"linear": name, "missing": True})
            continue
        _, xb, yb = got
        calls.append({"linear": name,
                      "input_max_abs_diff": float((xa.float() - xb.float()).abs().max()),
                      "output_max_abs_diff": float((ya.float() - yb.float()).abs().max()),
                      "output_max_abs": float(ya.float().abs().max())})
    lp = []
    for pa, pb in zip(a["logprobs"], b["logprobs"]):
        lp.append({str(t): [round(v, 5), round(pb.get(t, float("nan")), 5)] for t, v in pa.items()})
    return {"weights": weights, "calls": calls, "first_token_logprobs": lp}


def main() -> None:
    from tests.flextensor.test_flextensor_cpu import PROMPTS, flex_spec, weights_of
    from tests.flextensor.test_flextensor_gpu import BIG
    from tests.harness.checkpoints import BUILDERS
    from vllm_flextensor.planner import budget_for_dense_layers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="streamed_linear_diff.json")
    ap.add_argument("--no-deep-gemm", action="store_true")
    ap.add_argument("--kind", default="qwen3_fp8", help="checkpoint kind of tests/harness "
                    "(qwen3: a bf16 smoke run, also on CPU)")
    ap.add_argument("--timeout", type=float, default=400)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-dwdp-linear-diff-"))
    model = str(BUILDERS[args.kind](work / args.kind, **BIG))
    w = weights_of(model, dtype_bytes=2)
    budget = budget_for_dense_layers(w, 5, 2) + w.decoder_linear_bytes[0] // 2
    flex = flex_spec(model, budget, dense_prefetch_depth=2)["additional_config"]
    base_env = {"VLLM_DEEP_GEMM_WARMUP": "skip", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    specs = {"stock": {"env": dict(base_env, VLLM_PLUGINS="")},
             "flextensor": {"env": base_env, "additional_config": flex}}
    if args.no_deep_gemm:
        for n in list(specs):
            s = json.loads(json.dumps(specs[n]))
            s["env"]["VLLM_USE_DEEP_GEMM"] = "0"
            specs[n + "_no_deep_gemm"] = s
    procs = {}
    for name, s in specs.items():
        s.update(model=model, prompts=PROMPTS)
        sp = work / f"{name}.spec.json"
        sp.write_text(json.dumps(s))
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--child", str(sp), str(work / f"{name}.pt")],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    import torch

    done = {}
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        if rc == 0:
            done[name] = torch.load(work / f"{name}.pt", weights_only=False)
        else:
            print(f"{name}: rc {rc}; log tail:\n" + (work / f"{name}.log").read_text()[-3000:])
    report = {"command": "python benchmarks/streamed_linear_diff.py " + " ".join(sys.argv[1:]),
              "work": str(work), "engines": sorted(done), "pairs": {}}
    for suffix in ("", "_no_deep_gemm"):
        a, b = "stock" + suffix, "flextensor" + suffix
        if a in done and b in done:
            report["pairs"][f"{a} vs {b}"] = compare(done[a], done[b])
    Path(args.out).write_text(json.dumps(report, indent=1))
    for pair, r in report["pairs"].items():
        print(pair)
        for c in r["calls"][:12]:
            print("  ", c)
        bad = {n: {k: v for k, v in row.items() if isinstance(v, dict) and not v.get("equal")}
               for n, row in r["weights"].items() if row != "missing"}
        print("   weights differing:", json.dumps({n: v for n, v in bad.items() if v})[:3000])
        print("   kernels:", {n: row["other"] for n, row in list(r["weights"].items())[:2]})
        print("   logprobs:", r["first_token_logprobs"])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
