"""Running a trained SAM: the drop-in `SamPredictor` and `SamAutomaticMaskGenerator`, mask overlays,
and `segany-amg` with the options the inference commands share (`cli_options.py`)."""
