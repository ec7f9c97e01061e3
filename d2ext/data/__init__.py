from .synthetic import CLASS_NAMES, SyntheticShapesSpec, generate_image, load_split

__all__ = ["CLASS_NAMES", "SyntheticShapesSpec", "generate_image", "load_split"]
