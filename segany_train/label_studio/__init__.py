"""Label Studio, the annotation tool stages 1-2 run in with people: `segany-serve` (backend.py, an ML
backend serving a SAM checkpoint with a per-task embedding cache), the REST client the engine uses
(client.py) and the labeling config and regions (regions.py, no server imports)."""
