"""Ray Serve application for the champion model (see the serving issue).

Serving scores raw records with `churnlib.model.predictor.ChurnPredictor`, the same
feature function as training.
"""
