"""Training implicit language models: the paper's curriculum and learning-rate schedule, fine-tuning with accelerate."""
