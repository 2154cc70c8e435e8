"""The draft model: its config, its training and inference forms, its samples, training and checks."""
