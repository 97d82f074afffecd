"""Stage 2's class-agnostic box detector: a `BoxHead` trained on the frozen SAM embeddings of the
images annotated so far, with every mask's box as one generic "object" class (SAM paper, section 4).

Centre-based, as CenterNet: each box is assigned to the embedding cell holding its centre, in the
size slot its size falls in (box_head.py). Per slot, the objectness target is a Gaussian around each
centre (1 at the centre cell) trained with CenterNet's penalty-reduced focal loss; the box is
regressed at the centre cell and at neighbours where the Gaussian is high (weighted by it), so a
peak one cell off still carries a good box. Detection keeps the local maxima of each slot's
objectness above a threshold, then box NMS across slots removes an object found in two slots.

Boxes are XYXY in input pixels (the frame of the resized image, longest side = the encoder's image
size) unless a name says otherwise; SA-1B's `bbox` is XYWH in original image pixels.

    box_head.py          the head and its configuration
    box_targets.py       boxes -> per-cell training targets, and box parameters -> boxes
    detector_loss.py     focal objectness loss plus L1 and GIoU box regression
    image_embeddings.py  images -> frozen SAM embeddings, as the predictor computes them
    embedding_spool.py   embeddings on disk, mapped back as one tensor
    training_data.py     shards or (image, boxes) pairs -> embeddings and input-frame boxes
    training.py          fitting a head, and training one from images
    detection.py         embeddings -> boxes and scores
    head_file.py         saving and loading a trained head
    prefill.py           detected boxes as SAM prompts -> the confident masks to pre-fill (the engine's
                         stage 2 and segany-serve --prefill-detector)
"""
