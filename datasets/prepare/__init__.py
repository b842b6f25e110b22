"""Preparation of raw data sets: COCO masks, image-level class labels, SBD (train_aug)."""
