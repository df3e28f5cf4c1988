"""Head and expert ablation, ADA header reinsertion, rank-one redirection, refusal tokens.

Not implemented yet: see the project's interventions issue.
"""
