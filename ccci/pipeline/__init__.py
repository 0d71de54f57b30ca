"""Pipeline: a recipe's ci.yml, the dataflow scheduler that runs it, and its typed report."""
