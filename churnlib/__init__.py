"""Churn prediction on Ray and MLflow: config, data, features, training, tracking.

Importing this package has no side effects: no Ray start, no MLflow URI, no folders.
"""

__version__ = "0.1.0"
