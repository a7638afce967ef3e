"""MCPL: multi-modal collaborative prompt learning on a frozen CLIP-style backbone.

keywords.py (AP vocabularies, extraction hook, token sequences), prompts.py (GPCM, prompt
update, relation head), keyword_predictor.py, model.py (`McplModel`), backbone.py (where the
frozen backbone comes from), method.py (the `Mcpl` method). Downstream classification on
the frozen prompted image encoder (MCPL's MLP head: `--config.downstream.head_hidden=512`)
runs through `python -m medvlp_jax.downstream`, as every method's does.

Nothing is imported here: the data hook (keywords.py) is unpickled in light data-loader
worker processes, which should not import the model stack.
"""
