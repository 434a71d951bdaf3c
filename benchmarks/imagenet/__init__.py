"""The 224-px pipelines: EfficientNet-Lite0 (efficientnet) on the 1,000-image ImageNet sample (sample)."""
