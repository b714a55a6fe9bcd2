"""Detection fine-tuning of the pretrained image tower: a torchvision detector (Faster R-CNN, RetinaNet, FCOS) on the
tower's multi-scale features, the ``detection`` task and the ``coco`` evaluator (pycocotools mAP), COCO JSON
reading, and box-annotated shards. See docs/detection.md.

The task registers in ``mm_ptft.tasks.TASKS`` when :mod:`mm_ptft.finetune.detection.task` is imported (which
:mod:`mm_ptft.tasks` does); the evaluator in ``mm_ptft.eval.EVALUATORS`` likewise from :mod:`mm_ptft.eval`.
torchvision's detection modules and pycocotools are imported only when a detector is built or scored.
"""
