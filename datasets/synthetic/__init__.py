"""The embedded synthetic data sets (VOC- and COCO-format) and the label-noise generators."""
