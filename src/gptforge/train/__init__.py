"""Training: the loop (`loop`), optimizer and schedule (`optim`), reporting (`logging`), and the whole
text-to-model workflow with its size choice (`pipeline`). Names are imported on first use."""

from importlib import import_module

_EXPORTS = {
    "..options": ["TrainConfig", "SCRATCH_DEFAULTS", "FINETUNE_DEFAULTS", "parse_duration"],
    "..errors": ["RunFolderError", "TrainingError"],
    "..runtime": ["Dist", "init_distributed", "pick_precision", "resolve_device", "shard_model"],
    "..data.dataset": ["RunData", "load_run_data"],
    ".optim": ["apply_freeze", "configure_optimizer", "lr_at"],
    ".logging": ["RunLog"],
    ".loop": ["TrainResult", "Trainer", "refuse_previous_run"],
    ".pipeline": [
        "MAX_EPOCHS_COUNTED",
        "SCRATCH_SIZES",
        "TOKENS_PER_PARAM",
        "build_model",
        "choose_size",
        "load_model_folder",
        "matmul_flops",
        "run_training",
        "train",
        "training_rate",
    ],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gptforge.train' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
