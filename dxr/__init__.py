"""dxr: DiffusionXRay chest-radiograph restoration, and fused kernels for diffusion models.

``import dxr.ops`` (functional fused ops) and ``import dxr.nn`` (modules) need only torch and numpy;
the data, model and training modules import their heavier dependencies where they are used.
"""

__version__ = "0.1.0"
