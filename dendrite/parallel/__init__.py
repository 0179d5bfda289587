"""Tensor parallelism across GPUs of one host, and data-parallel engine replicas.

Tensor parallel (`Engine(model_dir, tensor_parallel=N)`): Megatron-style
splits of attention heads and MLP columns over N processes, one per device
(dendrite/parallel/sharding.py), with an all-reduce after o_proj and
down_proj. The native KV tree, the scheduler and the sampler stay in rank 0;
each step's `StepPlan` is sent to the other ranks, which run the same
`ModelRunner.execute` on their shard. KV pages are sharded by KV head: page
ids are the same on every rank, so a fork is still O(1) everywhere. See
docs/scaling.md for the design, and `launch` for process handling.

Data parallel (`dendrite.parallel.replicas.Replicas`): programs spread over N
engine processes with prefix-affinity routing. It sits at the program layer
(it runs programs); the rest of this package sits at the model layer.
"""

from dendrite.parallel.launch import RankSpec, WorkerError, start_tensor_parallel
from dendrite.parallel.runner import TensorParallelRunner, WorkerDied
from dendrite.parallel.sharding import check_tensor_parallel, load_shard, local_config

__all__ = [
    "RankSpec",
    "TensorParallelRunner",
    "WorkerDied",
    "WorkerError",
    "check_tensor_parallel",
    "load_shard",
    "local_config",
    "start_tensor_parallel",
]
