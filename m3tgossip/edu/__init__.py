"""The education workload and everything that needs torch: model, data, training, membership inference."""
