"""The embedded default: what `dcgen demo` runs on a laptop CPU with no downloads.

For now a DC-AE round trip on the bundled image (dcae_roundtrip.py); the full small-scale DC-Gen
reproduction (synthetic data, tiny FLUX, three-stage post-training) replaces it as the demo.
"""
