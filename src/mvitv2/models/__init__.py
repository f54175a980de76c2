"""Model parts: config, attention, blocks, the MViT network and the variant registry."""

from mvitv2.models.config import BlockSpec, MViTConfig, block_specs
from mvitv2.models.mvit import MViT
from mvitv2.models.registry import MODEL_CONFIGS, create_model, get_config, list_models

__all__ = [
    "MODEL_CONFIGS",
    "BlockSpec",
    "MViT",
    "MViTConfig",
    "block_specs",
    "create_model",
    "get_config",
    "list_models",
]
