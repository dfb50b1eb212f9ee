"""The offline tiny-CLIP benchmark: 20 procedural tasks, a contrastively pretrained tiny CLIP and one
fine-tuned vision tower per task, consumed by FusionBench's ``CLIPVisionModelPool`` / ``CLIPVisionModelTaskPool``
through ``config/{modelpool,taskpool}/…/tiny_clip_{8,14,20}.yaml``. Build with ``fusion-bench-tsv-build``."""
