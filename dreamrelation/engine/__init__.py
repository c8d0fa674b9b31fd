"""The relation-aware data engine (paper 3.3): generators (our pipeline or an ``images_api``), annotation
(``annotate``, ``keypoints``, ``pose``) and the annotator with its quality gates (``gates``)."""
