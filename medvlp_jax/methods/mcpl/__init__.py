"""MCPL: multi-modal collaborative prompt learning on a frozen CLIP-style backbone.

keywords.py (AP vocabularies, extraction hook, token sequences), prompts.py (GPCM, prompt
update, relation head), keyword_predictor.py, model.py (`McplModel`), backbone.py (where the
frozen backbone comes from), method.py (the `Mcpl` method), downstream.py (classification
with an MLP head on the frozen prompted image encoder).

Nothing is imported here: the data hook (keywords.py) is unpickled in light data-loader
worker processes, which should not import the model stack.
"""
