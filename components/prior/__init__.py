"""Second stage of VQGAN: transformer priors over the tokenizer's code grids (GPT and MaskGIT)."""
