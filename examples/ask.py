"""Ask an OpenAI-compatible server one completion question and print the answer.

    python examples/ask.py http://127.0.0.1:8000 MODEL "how fast is the expert pull"
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def wait_ready(base: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                r.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base} did not come up in {timeout:.0f} s") from None
            time.sleep(2)


def complete(base: str, model: str, prompt, max_tokens: int = 12) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "logprobs": 1}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
        out["served_by_rank"] = r.headers.get("X-DWDP-Rank")
        return out


if __name__ == "__main__":
    base, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    wait_ready(base)
    out = complete(base, model, prompt)
    print(f"prompt: {prompt!r}\nanswer: {out['choices'][0]['text']!r} "
          f"(DWDP rank {out['served_by_rank']})")
