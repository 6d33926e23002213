"""Distributed checkpoints on torch.distributed.checkpoint (DCP) that reshard on load.

``model.state_dict()`` of a sharded model already holds ``PieceTensor``s that stock ``dcp.save``/``dcp.load``
reshard; ``save``/``load`` add the optimizer (keyed by parameter name), scheduler and ``extra``, atomic
publication, the newest-complete pick, ``keep_last``, asynchronous saves and strict, named errors;
``export`` writes consolidated safetensors or a Hugging Face directory.
"""

from .directory import CheckpointError
from .export import export_hf, export_safetensors, read_model_state
from .load import load
from .optimizer_state import optimizer_state_dict
from .save import AsyncSave, save

__all__ = [
    "AsyncSave",
    "CheckpointError",
    "export_hf",
    "export_safetensors",
    "load",
    "optimizer_state_dict",
    "read_model_state",
    "save",
]
