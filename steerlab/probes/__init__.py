"""Linear probes on activations, position traces and the Latent Guard.

Not implemented yet: see the project's probes issue.
"""
