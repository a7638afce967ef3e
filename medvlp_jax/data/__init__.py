"""Data layer: records from SynthCXR / MIMIC-CXR-JPG / ROCO / manifests, and grain pipelines.

Entry points: `sources.load_records`, `sources.load_zero_shot_records`,
`tokenize.load_tokenizer`, `pipeline.train_iterator`, `pipeline.eval_batches`;
defaults in `config.default_data_config`.
"""
