from callbacks.rank_failures import *  # noqa: F401,F403 -- moved to callbacks/rank_failures.py (issue #11); re-export for framework.trainer until integration
