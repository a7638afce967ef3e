"""torchvision ResNet-50 state dicts saved as safetensors <-> our `ResNet50` variables.

Save one from PyTorch with
`safetensors.torch.save_file(torchvision.models.resnet50(...).state_dict(), path)`.
"""

from __future__ import annotations

from pathlib import Path

import jax
from safetensors.numpy import load_file, save_file

from medvlp_jax.models.convert.specs import resnet50_maps
from medvlp_jax.models.convert.tensors import CheckpointError, assign, extract
from medvlp_jax.models.resnet import ResNet50

_SKIP = ("fc.", "num_batches_tracked")


def _strip_module_prefix(tensors: dict) -> dict:
    """Drops a DataParallel 'module.' prefix if every name has it."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_torchvision_resnet50(
    path: str | Path, *, channels: int = 3, module: ResNet50 | None = None
) -> tuple[ResNet50, dict]:
    """(module, {'params', 'batch_stats'}) from a torchvision resnet50 state dict (safetensors).

    channels=1 builds a one-channel stem whose kernel is the RGB stem summed over channels.
    The classifier `fc` is skipped. Pass `module` to load into one you built (dtype options).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    tensors = _strip_module_prefix(load_file(str(path)))
    module = module or ResNet50(channels=channels)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs(1)))
    ignore = lambda name: name.startswith(_SKIP) or name.endswith(_SKIP)
    variables = assign(tensors, resnet50_maps(module), abstract, source=str(path), ignore=ignore)
    return module, variables


def export_torchvision_resnet50(variables, path: str | Path) -> Path:
    """Writes {'params', 'batch_stats'} of a ResNet50 as a torchvision state dict (no `fc`)."""
    tensors = extract(variables, resnet50_maps(ResNet50()))
    save_file(tensors, str(path))
    return Path(path)
