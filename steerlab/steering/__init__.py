"""Directions in the residual stream: fitting (difference of means, PCA, probe weights), selection and steer ops.

Not implemented yet: see the project's steering issue.
"""
