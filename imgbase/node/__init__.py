"""The lifecycle on a node: facts, the verbs that plan and change it, and the checks."""
