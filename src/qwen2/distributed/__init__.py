"""Past one process: tensor parallelism on torch.distributed (`from_pretrained(..., tp_plan="auto")` under
torchrun), the serving engine's ranks stepping in lockstep, and launch helpers. Imports the model; the model
imports this package only lazily, when `tp_plan` is given."""

from qwen2.distributed.group import TensorParallelError, init_process_group
from qwen2.distributed.plan import TensorParallelPlan, make_plan
from qwen2.distributed.sharding import TensorParallelLoader, VocabParallelEmbedding

__all__ = ["TensorParallelError", "TensorParallelLoader", "TensorParallelPlan", "VocabParallelEmbedding",
           "init_process_group", "make_plan"]
