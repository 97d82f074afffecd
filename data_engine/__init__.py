"""The data engine: simulated annotators, the three stages and the annotate -> retrain cycle (to come)."""
