"""A trained model used outside training: loading it (`loading`), as one module (`model`), applied to audio
(`predictor`), and exported as a self-contained folder (`export`, `exported`, `model_card`)."""
