"""Training (paper 3.4): relation triplets and the public data format (``data``), the losses of eq. 5-7
(``losses``), the relation-LoRA training loop (``training``) and the local encoder's self-distillation
(``distill``)."""
