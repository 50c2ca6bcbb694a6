"""``curate study SPEC``: the spec, preparing what the arms read, fitting each arm to the budget, training and evaluating, the report."""
