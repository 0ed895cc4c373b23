"""Datasets and input pipelines.

raw.py (reader output, skip counting), atomic.py (RecBole atomic / MovieLens),
amazon.py (Amazon Reviews 2018 / 2023), preprocess.py (filter, order, renumber),
dataset.py (`RecDataset`, save / load), candidates.py (stored evaluation negatives),
sampling.py (vectorised negative sampling), prepare.py (`prepare_dataset(config.data)`),
scenarios.py (cold / warm, cold users, few-shot, cross-domain), pipelines.py (grain),
prompts.py (stage-2 prompt templates).
"""
