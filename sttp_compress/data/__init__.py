"""Data readers that return datasets and loaders: image folders, tensor files, tokenized texts, scored pairs."""
