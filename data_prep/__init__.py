"""Thin data-preparation scripts over bonehpc.data (synthetic data set, packing)."""
