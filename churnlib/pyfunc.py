"""Where models logged before the stage folders find their MLflow wrapper (``churnlib.pyfunc.ChurnModel``).

A logged pyfunc model pickles the wrapper class by its module path; the class
now lives in ``churnlib.model.pyfunc``. Nothing in the project imports this module.
"""

from churnlib.model.pyfunc import ChurnModel

__all__ = ["ChurnModel"]
