"""The retention decision: what contacting a customer is worth, and whom to contact.

A churn score is worth what the retention team does with it. ``value`` holds the
arithmetic every stage shares (evaluation today; scoring and serving read the same
functions): the expected net value of contacting a customer, the value of a cut
on labelled data, the best cut, the capacity limit, cumulative gains and lift.
Pure numpy, no Ray, no MLflow.
"""
