"""Command-line tools: the demo, synthetic data, data preparation, the noise study."""
