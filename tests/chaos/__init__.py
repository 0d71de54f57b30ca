"""The chaos drill (issue 9): ccci under random SIGKILLs, every invariant checked; see drill.py."""
