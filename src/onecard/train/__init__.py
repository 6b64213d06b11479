"""Training: model loading (model.py), optimizers (optim.py), checkpoints, metrics, the loop (loop.py).

Entry points: ``onecard.train.loop.train(recipe, resume=False, console=None)`` and
``onecard.train.model.load_model_and_tokenizer(recipe, device)``. Nothing imported here: torch stays lazy.
"""
