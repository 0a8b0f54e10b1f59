"""Ready-made example workloads (conf/experiment/): digit classification and a character-level language model."""
