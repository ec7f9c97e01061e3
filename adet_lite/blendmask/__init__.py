"""BlendMask: meta-architecture ``BlendMask`` (FCOS + top attention layer + basis module + blender)."""
from .basis_module import BASIS_MODULE_REGISTRY, ProtoNet, build_basis_module
from .blender import Blender, blend, blender_mask_loss
from .blendmask import BlendMask
from .config import add_blendmask_config

__all__ = ["BASIS_MODULE_REGISTRY", "BlendMask", "Blender", "ProtoNet", "add_blendmask_config", "blend",
           "blender_mask_loss", "build_basis_module"]
