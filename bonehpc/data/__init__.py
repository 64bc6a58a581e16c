"""Data: official or synthetic MURA, manifest, patient-grouped folds, HDF5 shards and loaders."""
