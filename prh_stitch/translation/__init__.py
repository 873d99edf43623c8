"""Translation without pairs: data, protocol and report of the unsupervised embedding-translation experiments."""
