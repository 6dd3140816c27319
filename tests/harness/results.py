"""Record what a GPU test measured as JSON, when a results folder is given.

``DWDP_RESULTS_DIR`` names the folder (the GPU check sets it to the device's $OUT) and
``DWDP_RESULTS_COMMAND`` the command that ran, so every committed number carries it.
"""

from __future__ import annotations

import json
import os
import platform
import time


def gpu_info() -> dict:
    try:
        import torch

        n = torch.cuda.device_count()
        return {"num_gpus": n, "gpu_model": torch.cuda.get_device_name(0) if n else None,
                "torch_version": torch.__version__}
    except Exception as e:  # recorded, not hidden: the JSON says why there is no GPU info
        return {"num_gpus": 0, "gpu_info_error": repr(e)}


def record_result(name: str, payload: dict) -> str | None:
    folder = os.environ.get("DWDP_RESULTS_DIR")
    if not folder:
        return None
    import vllm

    row = {
        "name": name,
        "vllm_version": vllm.__version__,
        **gpu_info(),
        "python": platform.python_version(),
        "command": os.environ.get("DWDP_RESULTS_COMMAND", ""),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(row, f, indent=2)
    return path
