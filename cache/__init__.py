"""The HDF5 feature store between the stages. Knows nothing of tasks or models: ids, splits, labels, features."""
