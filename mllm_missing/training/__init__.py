"""Training shared by recipes: `TrainConfig`, the resumable loop (`fit`) and `run_training`."""
