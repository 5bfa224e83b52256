"""The training application: the cross-validated training loop (``loop``), atomic checkpoints
(``checkpoint``) and model selection between finished runs (``select``)."""
