"""Networks of the first stage: the fixed-BN ResNet backbone, the CAM network and IRN."""
from __future__ import annotations

import importlib
from types import ModuleType


def network_module(name: str) -> ModuleType:
    """The module a ``cam_network`` / ``irn_network`` setting names. The names are the
    reference's (``net.resnet50_cam``): modules under first-stage/irn, which is installed as
    the package ``irn``."""
    return importlib.import_module(f".{name}", package="irn")
