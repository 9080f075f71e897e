"""Calibration for data-aware merges: task rows (:mod:`.rows`), activation Grams (:mod:`.grams`), parameter
importance (:mod:`.importance`) and the model states they work on (:mod:`.cache`)."""
