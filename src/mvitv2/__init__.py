"""mvitv2: MViTv2 for image classification, detection and video, with every checkpoint format."""

from mvitv2.models import MViT, MViTConfig, create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = ["MViT", "MViTConfig", "__version__", "create_model", "get_config", "list_models"]


def __getattr__(name: str):
    # Heavier parts load on first use so `import mvitv2` stays light.
    if name == "load_checkpoint":
        from mvitv2.weights import load_checkpoint

        return load_checkpoint
    if name == "create_detector":
        from mvitv2.tasks.detect import create_detector

        return create_detector
    if name == "Predictor":
        from mvitv2.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'mvitv2' has no attribute {name!r}")
