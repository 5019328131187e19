"""The project's own tiny pretrained LM: corpus generator, BPE tokenizer, pretraining, `meerkat tiny-model`."""
