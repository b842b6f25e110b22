"""VOC-format data access for the first stage."""
