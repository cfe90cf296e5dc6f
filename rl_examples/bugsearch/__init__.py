"""Helpers of rl_examples/bug_search.py: the pinned project and its injected bug
(project.py), the test runner that runs inside the sandbox (runner.py), the scripted
policy that proposes edits (policy.py) and the three ways of keeping search states
(backends.py: DeltaBox full, DeltaBox fs, plain CRIU + copies)."""
