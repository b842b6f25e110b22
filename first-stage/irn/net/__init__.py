"""Networks of the first stage: the fixed-BN ResNet backbone, the CAM network (and, PART B, IRN)."""
