"""Training the embedded LLaVA-NeXT on ``hires_detail`` (``python -m runners.train_tiny``).

Two stages, as LLaVA itself is built from a pretrained CLIP and a pretrained LLM:

1. ``vision``: the CLIP tower alone on single 336 px views (thumbnails and crops), with a
   multi-label presence head on its pooled [CLS] (so the last layer's [CLS] attends to objects, as
   GlobalCom2 assumes) and a per-patch head on the feature layer (so LLaVA's visual tokens say what
   they show);
2. ``language``: projector, ``image_newline`` and the language model on several questions per
   image (each its own inference prompt: ``conversation``), from tower features cached once (the tower is frozen): first a warm-up on
   symbolic image tokens and the projector's alignment to them (``symbolic``), then the real
   features (``crops`` on single crops, optional; whole images).

The heads of stage 1 and ``AskedHeads`` are training scaffolding and are not exported.
"""
