"""cnnjax: verified Flax Linen CNN building blocks, a model zoo, training and analysis tools.

``import cnnjax`` needs neither TensorFlow nor torch.
"""

__version__ = "0.1.0"
